"""Write ``examples/data/support_tickets.csv``: synthetic support tickets labelled with their department.

The example data of the ``dataset`` env (``recipes/dataset_grpo.yaml``, ``docs/dataset.md``): 600 rows of
``id,subject,message,department``, department one of billing / technical / account / shipping, drawn from
templates with a fixed seed (the file is the same on every run), no (subject, message) twice. A few
tickets mention a second department's words in passing, so that keyword matching alone does not solve it.

    python scripts/make_dataset_example.py [--rows 600] [--out examples/data/support_tickets.csv]
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

SUBJECTS = {
    "billing": ["Charged twice", "Refund request", "Invoice question", "Wrong amount", "Payment failed"],
    "technical": ["App crashes", "Error on login page", "Sync not working", "Slow dashboard", "Bug report"],
    "account": [
        "Change my email",
        "Close my account",
        "Password reset",
        "Update profile",
        "Two-factor setup",
    ],
    "shipping": [
        "Where is my order",
        "Package damaged",
        "Change delivery address",
        "Late delivery",
        "Tracking",
    ],
}
BODIES = {
    "billing": [
        "I was charged {amount} twice on my card this month for order {order}.",
        "Please refund the {amount} I paid for a plan I cancelled on {day}.",
        "My invoice for {month} shows {amount}, but my plan costs less than that.",
        "The payment of {amount} keeps failing although my card is valid.",
    ],
    "technical": [
        "The app closes as soon as I open the {screen} screen on my {device}.",
        "I get error code {code} every time I try to save a report.",
        "Since the update on {day} the {screen} page takes a minute to load.",
        "Data from my {device} does not sync with the web version anymore.",
    ],
    "account": [
        "I would like to change the email address on my account to a new one.",
        "Please close my account and delete my personal data.",
        "I cannot reset my password: the link in the email has expired.",
        "How do I turn on two-factor authentication for my login on my {device}?",
    ],
    "shipping": [
        "Order {order} was supposed to arrive on {day} and it has not come yet.",
        "The parcel for order {order} arrived with a broken box and a damaged item.",
        "Can you send order {order} to my office instead of my home address?",
        "The tracking number for order {order} has not updated since {day}.",
    ],
}
ASIDES = {
    "billing": "I already paid for it, by the way.",
    "technical": "The app itself works fine.",
    "account": "I am logged in to my account right now.",
    "shipping": "My last order arrived on time.",
}
NAMES = [
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Elif",
    "Femi",
    "Gus",
    "Hana",
    "Ivan",
    "Jo",
    "Kai",
    "Lena",
    "Marco",
    "Nia",
]
FILL = {
    "amount": lambda r: f"${r.randint(5, 400)}.{r.randint(0, 99):02d}",
    "order": lambda r: f"#{r.randint(10000, 99999)}",
    "day": lambda r: r.choice(["Monday", "Tuesday", "Friday", "March 3", "April 12", "last week"]),
    "month": lambda r: r.choice(["January", "February", "March", "April", "May"]),
    "screen": lambda r: r.choice(["settings", "reports", "home", "billing history"]),
    "device": lambda r: r.choice(["iPhone", "Android phone", "tablet", "laptop"]),
    "code": lambda r: str(r.randint(100, 599)),
}


def ticket(rng: random.Random) -> tuple[str, str, str]:
    """(subject, message, department) of one synthetic ticket."""
    dept = rng.choice(sorted(SUBJECTS))
    body = rng.choice(BODIES[dept])
    body = body.format(**{k: f(rng) for k, f in FILL.items() if "{" + k + "}" in body})
    if rng.random() < 0.2:  # a distractor: another department's words, in passing
        other = rng.choice([d for d in sorted(ASIDES) if d != dept])
        body = f"{body} {ASIDES[other]}"
    return rng.choice(SUBJECTS[dept]), f"{body} Thanks, {rng.choice(NAMES)}", dept


def main() -> None:
    """Write the CSV."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument(
        "--out", default=str(Path(__file__).parents[1] / "examples" / "data" / "support_tickets.csv")
    )
    args = parser.parse_args()
    rng = random.Random(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "subject", "message", "department"])
        seen: set[tuple[str, str]] = set()
        while len(seen) < args.rows:
            subject, message, dept = ticket(rng)
            if (subject, message) not in seen:  # no prompt twice: each would be two rows in two splits
                seen.add((subject, message))
                writer.writerow([f"T{len(seen):05d}", subject, message, dept])
    print(f"wrote {args.rows} rows to {out}")


if __name__ == "__main__":
    main()
