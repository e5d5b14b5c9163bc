"""Which group each example belongs to, per attribute: a configured column (fairness.group_fields),
or an identity-term category found in the text (fairness.lexicon; "none" when no term occurs)."""

from __future__ import annotations

from tunesmith.data.examples import MISSING_GROUP as MISSING
from tunesmith.data.examples import Example
from tunesmith.data.lexicon import find_term


def attributes(examples: list[Example], group_fields: list[str], lexicon: list[str]) -> dict[str, list[str]]:
    """{attribute: [group of each example]}: columns first, then lexicon categories."""
    out = {}
    for name in group_fields:
        out[name] = [str((e.attributes or {}).get(name, MISSING)) for e in examples]
    for category in lexicon:
        out[category] = [find_term(e.input, category) or "none" for e in examples]
    return out


def eligible(groups: list[str], min_size: int) -> set[str]:
    """Groups with at least `min_size` examples (smaller ones give no stable rates)."""
    counts: dict[str, int] = {}
    for g in groups:
        counts[g] = counts.get(g, 0) + 1
    return {g for g, n in counts.items() if n >= min_size and g != MISSING}


def shown_groups(groups: list[str], most: int = 5) -> str:
    """Group values for a message or a report: the first `most`, each cut to 60 characters (a value is
    whatever a data column held, however long) and said how many more there are."""
    cut = [g if len(g) <= 60 else g[:57] + "..." for g in groups[:most]]
    more = f" and {len(groups) - most} more" if len(groups) > most else ""
    return ", ".join(cut) + more
