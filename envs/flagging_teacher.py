"""The teacher of ``policy_flagging``: a rule engine still configured with last year's policy.

Workflow it stands for: the bank's transaction-screening rule engine, whose configuration was last updated a
year ago. It reads the transaction from the prompt like the oracle does, but applies its own stale copy of
two rules instead of the ones written in the prompt:

- R1: last year's amount threshold, 9/10 of the written one ($4,500 where the policy says $5,000), so it
  flags clear transactions over the old threshold but not over the new one: the R1 near misses and a few
  others (false alarms; prompt cue: an amount within 10% under the written threshold,
  ``Task.info["amount_band"] == "within_10pct_under"``).
- R2: the sanctions list before its two latest additions, the countries the policy lists last (Cuba and
  Belarus at ``difficulty="basic"``), so it clears transfers to them (missed flags; prompt cue: the
  destination is the 4th or 5th country R2 lists, ``Task.info["listed_position"] in (4, 5)``).

R3 and R4 it applies as written. It answers in the format the prompt asks for (``FLAG R<n>``, ``FLAG`` or
``CLEAR``, after check lines that show its stale comparisons where the prompt asks for a checklist).

Measured accuracy (decision correct; 200 tasks, seed 0), at the recipes' options (``policy_flagging_grpo``
and ``quickstart``), which are the default options: eval 0.855 and test 0.845, beside the oracle's 1.000
and the best trivial policy's (``only_R*``) 0.670; every error lies in the two slices above (seeds 0-7 of
both splits: 0.835-0.885, mean 0.860). Elsewhere, eval seed 0: 0.850 at ``difficulty="varied"``, 0.910 at
``"combined"`` (best trivial 0.625; its R4 is not stale, so the rule engine fares better there).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

from rltk_envs import money
from rltk_envs.flagging_prompt import Rules, asked_format, read

from rltk.env import Message, Teacher

STALE_THRESHOLD = (9, 10)  # last year's R1 threshold, as a fraction of the written one
NEW_LISTINGS = 2  # countries added to R2's list since (the policy lists them last): the engine lacks them


class StalePolicyTeacher(Teacher):
    """A rule engine with last year's policy: R1 threshold 9/10 of the written one, R2 list less 2 countries.

    Attributes:
        weak_slices: The transactions between the stale and the written policy: an amount within 10% under
            R1's threshold (flagged, wrongly, when nothing else is broken), or a transfer to one of the two
            countries R2 lists last (cleared, wrongly, unless the stale R1 flags it).

    """

    weak_slices: ClassVar[dict[str, tuple[Any, ...]]] = {
        "amount_band": ("within_10pct_under",),
        "listed_position": (4, 5),
    }

    def __call__(self, messages: list[Message]) -> str:
        """The engine's answer for the prompt; ``CLEAR`` for a conversation it cannot read (never raises)."""
        try:
            ask_rule, checklist = asked_format(messages)
            rules, amount, country, counts = read(messages)
        except Exception:  # not a policy_flagging prompt: the engine lets it through
            return "CLEAR"
        num, den = STALE_THRESHOLD
        old_list = rules.countries[: max(0, len(rules.countries) - NEW_LISTINGS)]
        stale = replace(rules, threshold=rules.threshold * num // den, countries=old_list)
        broken = stale.broken(amount, country, counts)
        first = next((r for r, b in zip(stale.ids, broken, strict=True) if b), None)
        answer = "CLEAR" if first is None else f"FLAG {first}" if ask_rule else "FLAG"
        if not checklist:
            return answer
        return "\n".join([*_checks(stale, amount, country, counts, broken), answer])


def _checks(rules: Rules, amount: int, country: str, counts: dict[str, int], broken: list[bool]) -> list[str]:
    """The engine's check lines (one per rule of ``rules``), comparing against its own, stale values."""
    yn = ["yes" if b else "no" for b in broken]
    shown, threshold, lower = money(amount), money(rules.threshold, False), money(rules.lower, False)
    lines = [
        f"R1: {shown} over {threshold}? {yn[0]}",
        f"R2: {country} listed? {yn[1]}",
        f"R3: {counts.get(rules.window, 0)} over {rules.limit}? {yn[2]}",
        f"R4: {shown} over {lower}, {country} watch-listed? {yn[-1]}",
    ]
    return lines[: len(yn)]
