"""Invoice and receipt field extraction into a JSON object matching a schema written in the prompt.

Workflow: a bookkeeper keys invoices and receipts into a ledger. The document comes in varied layouts
(``key_value`` lines, ``plain`` lines, a ``table`` of items, a till ``receipt``), currencies (symbols or ISO
codes, ``1,234.50`` / ``1.234,50`` / ``1 234,50``) and date formats; the reply is one JSON object with the
schema's keys: vendor, invoice_number, date (ISO), currency (ISO code), total, and at harder levels tax and
due_date, ``null`` where the document does not show the field. Rewarded (``rltk_rewards.invoice``): a valid
JSON object with exactly the schema's keys and value types, and field-level F1 against the gold fields
(amounts, dates, currencies and text normalized first). ``check`` says ``correct`` when every field is right.

Difficulty: ``easy`` (2 layouts, 5 fields, all shown, no distractor amounts, no noise); ``medium`` (4 layouts,
+ tax, absent in 30%, subtotal and customer distractors, more number/date formats, broken spacing); ``hard``
(+ due_date, absent fields, OCR-like noise: ``0``/``O`` and ``1``/``l`` confusions, broken spacing, stray
``|``/``~``). Layouts are stratified: every block of 4 (easy: 2) tasks holds each layout once. The oracle
reads the document back with :mod:`rltk_envs.invoice_reader`.

Teacher (:mod:`rltk_envs.invoice_teacher`): a label-template extractor that reads ``Label: value`` lines and
so misses a vendor printed as an unlabelled letterhead: it gets every ``plain`` (and ``table``/``receipt``)
layout task wrong. At ``easy`` (the recipe's and the default options), 200 tasks, seed 0: 50.0% on eval and
test (oracle 100%, best trivial 0%), all of its errors in ``layout=plain``.

Best-of-N: :meth:`InvoiceExtractionEnv.final_answer` votes per field on normalized values (amounts to cents,
dates ISO, currency codes, text folded as ``check`` folds it); :meth:`~InvoiceExtractionEnv.compose_answer`
writes the per-field winners back as one JSON answer.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from collections import Counter
from collections.abc import Hashable
from typing import Any, ClassVar

from rltk_envs import data
from rltk_envs.invoice_reader import read_document
from rltk_envs.invoice_teacher import TemplateExtractorTeacher
from rltk_rewards.invoice import normalize, parse_reply, score_reply

from rltk.env import SPLITS, Env, FinalAnswer, Message, Policy, Task, Teacher, check_choice, draw_task

DIFFICULTIES = ("easy", "medium", "hard")
_TYPES = {"string": "string", "date": '"YYYY-MM-DD"', "currency": '"ISO code"', "number": "number"}


def _data() -> dict[str, Any]:
    return data("invoice_extraction")


def _money(cents: int, code: str, style: str, grouping: str) -> str:
    """An amount as a document shows it: ``$1,234.50``, ``EUR 1.234,50``, ``1 234,50 CHF``, bare ``1,234``."""
    cur = _data()["currencies"][code]
    whole, frac = divmod(cents, 100)
    if not cur["decimals"]:
        grouping = "en"
    num = f"{whole:,}".replace(",", {"en": ",", "eu": ".", "space": " "}[grouping])
    num += ("." if grouping == "en" else ",") + f"{frac:02d}" if cur["decimals"] else ""
    symbol = cur["symbol"] if "symbol" in style else None
    if style == "bare":
        return num
    if style.endswith("prefix"):
        return f"{symbol}{num}" if symbol else f"{code} {num}"
    return f"{num} {symbol or code}"


def _date(day: dt.date, fmt: str) -> str:
    month = _data()["months"][day.month - 1]
    return {
        "iso": day.isoformat(),
        "d_mon_y": f"{day.day} {month[:3]} {day.year}",
        "month_d_y": f"{month} {day.day}, {day.year}",
        "dmy_dot": day.strftime("%d.%m.%Y"),
        "ymd_slash": day.strftime("%Y/%m/%d"),
    }[fmt]


def _noisy(label: str, sep: str, value: str, kind: str, noise: dict[str, float], rng: random.Random) -> str:
    """One field line, with OCR-like noise that a careful reader can still undo."""
    if rng.random() < noise["confuse_label"]:
        swap = {"o": "0", "O": "0", "l": "1", "i": "1", "I": "l", "s": "5", "S": "5"}
        label = "".join(swap[c] if c in swap and rng.random() < 0.5 else c for c in label)
    if kind in ("amount", "date") and rng.random() < noise["confuse_value"]:
        spots = [m.start() for m in re.finditer(r"(?<=\d)[01]|[01](?=\d)", value)]
        if spots:
            i = rng.choice(spots)
            value = value[:i] + {"0": "O", "1": "l"}[value[i]] + value[i + 1 :]
    if rng.random() < noise["spacing"]:
        op = rng.randrange(3)
        if op == 0 and len(label) > 3:
            i = rng.randrange(1, len(label) - 1)
            label = label[:i] + " " + label[i:]
        else:
            sep = rng.choice({": ": [":", " : ", ":   "], " | | ": [" || ", " |  | "]}.get(sep, [" " * 3]))
    line = f"{label}{sep}{value}"
    if rng.random() < noise["junk"]:
        line = rng.choice(["| " + line, line + " |", line + " ~", "' " + line])
    return line


class InvoiceExtractionEnv(Env):
    """Extract invoice/receipt fields into a JSON object matching the schema in the prompt.

    Args:
        difficulty: ``"easy"``, ``"medium"`` or ``"hard"`` (layout variety, noise, field count; see module).

    """

    name = "invoice_extraction"
    description = "Extract vendor, number, dates, currency and amounts from noisy invoices/receipts as JSON."
    max_new_tokens = 128  # the oracle's JSON takes at most ~95 SmolLM2 tokens
    default_rewards: ClassVar[dict[str, float]] = {"invoice_field_f1": 1.0, "invoice_json_valid": 0.2}

    def __init__(self, difficulty: str = "easy", **options: Any) -> None:
        super().__init__(**options)
        check_choice("difficulty", difficulty, DIFFICULTIES)
        self.difficulty = difficulty
        self.level = _data()["levels"][difficulty]
        self._constant: str | None = None

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """``n`` tasks of ``split``; prefix-stable, disjoint across splits by prompt hash."""
        check_choice("split", split, SPLITS)
        layouts = self.level["layouts"]
        seen: set[str] = set()
        schema = {k: _data()["schema_types"][k] for k in self.level["fields"]}
        out: list[Task] = []
        for i in range(n):
            order = random.Random(f"{seed}:{split}:layout:{i // len(layouts)}").sample(layouts, len(layouts))
            layout = order[i % len(layouts)]

            def draw(attempt: int, i: int = i, layout: str = layout) -> Task:
                rng = random.Random(f"{self.difficulty}:{seed}:{split}:{i}:{attempt}")
                messages, answer = self._sample(rng, layout)
                info = {
                    "difficulty": self.difficulty,
                    "layout": layout,
                    "currency": answer["currency"],
                    "absent": sum(v is None for v in answer.values()),
                }
                reference = {"schema": schema, "answer": answer}
                return Task(f"{self.name}/{split}/{seed}/{i}", split, messages, reference, info)

            out.append(draw_task(split, seen, draw, 10_000))
        return out

    def _sample(self, rng: random.Random, layout: str) -> tuple[list[Message], dict[str, Any]]:
        data, fields = _data(), self.level["fields"]
        code = rng.choice(sorted(data["currencies"]))
        unit = 1 if data["currencies"][code]["decimals"] else 100  # cents per smallest shown unit
        absent = {f for f, p in self.level["absent"].items() if rng.random() < p}
        absent |= {"due_date"} if layout == "receipt" else set()
        items = [
            (rng.choice(data["items"]), rng.randint(1, 4), round(10 ** rng.uniform(2.7, 5)) * unit)
            for _ in range(rng.randint(1, 3))
        ]
        subtotal, rate = sum(q * p for _, q, p in items), rng.choice(data["tax_rates"])
        tax = round(subtotal * rate / 100 / unit) * unit if "tax" in fields and "tax" not in absent else 0
        day = dt.date(2022, 1, 1) + dt.timedelta(days=rng.randrange(4 * 365))
        due = day + dt.timedelta(days=rng.choice(data["due_days"]))

        def part(m: re.Match[str]) -> str:
            spec = m.group(1)
            if spec in ("y", "L"):
                return str(day.year) if spec == "y" else rng.choice(data["number_letters"])
            return "".join(rng.choice("0123456789") for _ in range(int(spec[1])))

        full = {
            "vendor": f"{rng.choice(data['vendor_prefixes'])} {rng.choice(data['vendor_suffixes'])}",
            "invoice_number": re.sub(r"\{(d\d|L|y)\}", part, rng.choice(data["number_formats"])),
            "date": day.isoformat(),
            "due_date": due.isoformat(),
            "currency": code,
            "total": (subtotal + tax) / 100,
            "tax": tax / 100,
        }
        answer = {k: None if k in absent else full[k] for k in fields}
        doc = {"layout": layout, "items": items, "subtotal": subtotal, "rate": rate, "day": day, "due": due}
        schema = ", ".join(f'"{k}": {_TYPES[data["schema_types"][k]]}' for k in fields)
        messages = [
            {"role": "system", "content": data["system"].format(schema="{" + schema + "}")},
            {"role": "user", "content": self._render(rng, answer, doc)},
        ]
        return messages, answer

    def _render(self, rng: random.Random, answer: dict[str, Any], doc: dict[str, Any]) -> str:
        """The document text: one field per line, in the layout's style, with the level's noise."""
        data, lv, layout = _data(), self.level, doc["layout"]
        code, style, grouping = (
            answer["currency"],
            rng.choice(lv["money_styles"]),
            rng.choice(lv["groupings"]),
        )
        dfmt, upper = rng.choice(lv["date_formats"]), layout == "receipt"
        sep = {"key_value": ": ", "plain": " ", "table": " | | ", "receipt": "  "}[layout]
        bare = layout in ("table", "receipt") or (
            layout == "key_value" and lv["tax_line"] and rng.random() < 0.3
        )

        def field(key: str, value: str, kind: str = "amount", s: str = sep, label: str | None = None) -> str:
            label = label or rng.choice(data["labels"][key])
            return _noisy(label.upper() if upper else label, s, value, kind, lv["noise"], rng)

        def amount(cents: int, currency: bool = False) -> str:
            return _money(cents, code, style if currency or not bare else "bare", grouping)

        head_sep = " " if layout == "plain" else ": "
        header = []
        if answer["invoice_number"] is not None:
            label = rng.choice(data["receipt_number_labels"]) if upper else None
            header.append(field("invoice_number", answer["invoice_number"], "text", head_sep, label))
        time = f" {rng.randint(8, 21)}:{rng.randint(0, 59):02d}" if upper else ""
        header.append(field("date", _date(doc["day"], dfmt) + time, "date", head_sep))
        if answer.get("due_date") is not None:
            header.append(field("due_date", _date(doc["due"], dfmt), "date", head_sep))
        if "tax" in lv["fields"] and not upper and rng.random() < 0.5:
            header.append(field("customer", rng.choice(data["customers"]), "text", head_sep))
        if layout in ("key_value", "plain"):
            rng.shuffle(header)
        lines = (
            [rng.choice(data["titles"][layout])] if layout in data["titles"] and rng.random() < 0.5 else []
        )
        vendor = answer["vendor"]
        if layout == "key_value":
            lines.append(field("vendor", vendor, "text"))
        else:
            if rng.random() < lv["noise"]["spacing"]:
                i = rng.randrange(1, len(vendor) - 1)
                vendor = vendor[:i] + " " + vendor[i:]
            lines += [f"*** {vendor.upper()} ***" if upper else vendor]
            lines += [f"{rng.randint(1, 299)} {rng.choice(data['streets'])}"]
        lines += header + ([field("currency", code, "text")] if layout == "key_value" and bare else [])
        if layout == "table":
            lines += ["Item | Qty | Amount", *(f"{n} | {q} | {amount(q * p)}" for n, q, p in doc["items"])]
        elif upper:
            lines += [f"{q} x {n}  {amount(q * p)}" for n, q, p in doc["items"]]
        if answer.get("tax") is not None:
            lines.append(field("subtotal", amount(doc["subtotal"])))
            label = f"{rng.choice(data['labels']['tax'])} {doc['rate']}%"
            lines.append(field("tax", amount(round(answer["tax"] * 100)), label=label))
        lines.append(field("total", amount(round(answer["total"] * 100), layout != "key_value" or not bare)))
        return "\n".join(lines + ([rng.choice(data["receipt_footers"])] if upper else []))

    def check(self, task: Task, completion: str) -> dict[str, Any]:
        """Verdict: ``correct`` (every field right, nothing extra), ``f1``, ``valid`` (JSON and schema)."""
        return score_reply(completion, task.reference)

    def oracle(self, messages: list[Message]) -> str:
        """Read the schema keys and the document from the prompt text and write the JSON answer."""
        keys = re.findall(r'"(\w+)":', messages[0]["content"])
        found = read_document(messages[-1]["content"])
        return json.dumps({k: found.get(k) for k in keys}, ensure_ascii=False)

    def teacher(self) -> Teacher:
        """The label-template extractor that misses letterhead vendors (:mod:`rltk_envs.invoice_teacher`)."""
        return TemplateExtractorTeacher()

    def final_answer(self, messages: list[Message], actions: list[str]) -> FinalAnswer:
        """The last turn's JSON object as ``{schema key: normalized value}``, for a per-field vote.

        Keys come from the schema in the prompt. A null, ``""`` or missing field votes ``None`` (no value,
        as ``check`` reads all three); a value votes in the form ``check`` compares: an amount rounded to
        cents, a date in ISO, a currency as its code, text case- and punctuation-folded. A value that cannot
        normalize (a word for an amount, a number for the vendor) can never be right, so that field abstains
        (left out of the dict). The whole sample abstains (None) when the turn is not exactly one JSON
        object or the object holds none of the schema's keys.
        """
        obj = parse_reply(actions[-1]) if actions else None
        types = _data()["schema_types"]
        keys = [k for k in re.findall(r'"(\w+)":', messages[0]["content"] if messages else "") if k in types]
        if obj is None or not set(obj) & set(keys):
            return None
        votes: dict[str, Hashable] = {}
        for key in keys:
            value, kind = obj.get(key), types[key]
            if value is None or value == "":
                votes[key] = None
                continue
            norm = normalize(kind, value)
            if norm is not None:
                votes[key] = norm
        return votes

    def compose_answer(self, fields: dict[str, Hashable]) -> str:
        """The answer JSON with this level's schema keys, each the voted value (``null`` where none won)."""
        return json.dumps({k: fields.get(k) for k in self.level["fields"]}, ensure_ascii=False)

    def baselines(self) -> dict[str, Policy]:
        """The most frequent value per field over 500 train tasks, an echo of the input, all nulls."""
        if self._constant is None:
            answers = [t.reference["answer"] for t in self.tasks("train", 500)]
            mode = {k: Counter(json.dumps(a[k]) for a in answers).most_common(1)[0][0] for k in answers[0]}
            self._constant = "{" + ", ".join(f'"{k}": {v}' for k, v in mode.items()) + "}"
        constant = self._constant
        nulls = "{" + ", ".join(f'"{k}": null' for k in self.level["fields"]) + "}"
        return {
            "most_frequent": lambda m: constant,
            "echo_input": lambda m: m[-1]["content"],
            "empty_nulls": lambda m: nulls,
        }
