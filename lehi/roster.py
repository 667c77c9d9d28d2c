"""The optimizer roster: every optimizer the suite compares, declared once.

An entry gives the optimizer's config name (``optimizer.name``, conf/optimizer/<name>.yaml),
its display label, its colour in every figure, its role in the comparison (``baseline`` or
``candidate``: significance tests put each candidate against each baseline) and its place in
tables and legends. Adding an optimizer means its module, its config and one entry here.

A run relabelled with ``optimizer.label=<label>`` keeps ``optimizer.name``: it is shown under
its label, in its name's colour and role, sorted after its name's entry. An optimizer name
missing here gets :data:`NEUTRAL_COLOR` and the role ``candidate``, after every entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "NEUTRAL_COLOR",
    "REFERENCE",
    "ROSTER",
    "Entry",
    "color",
    "display_label",
    "entry",
    "names",
    "rank",
    "role",
]

Role = Literal["baseline", "candidate"]


@dataclass(frozen=True)
class Entry:
    """One optimizer of the roster."""

    name: str  # optimizer.name in the configs
    label: str  # how tables, legends and titles show it
    color: str  # the same colour in every figure
    role: Role
    order: int  # place in tables and legends (ascending)


# Okabe-Ito colours (colour-blind safe).
ROSTER: tuple[Entry, ...] = (
    Entry("adam", "Adam", "#0072B2", "baseline", 0),
    Entry("adamw", "AdamW", "#56B4E9", "baseline", 1),
    Entry("sophia", "Sophia", "#009E73", "baseline", 2),
    Entry("lehi", "LEHI", "#D55E00", "candidate", 3),
    Entry("lehibrid", "LEHIBrid", "#CC79A7", "candidate", 4),
)

#: The optimizer every paper compares against: targets and overheads are relative to it.
REFERENCE = "adam"
NEUTRAL_COLOR = "#7F7F7F"


def _by_name() -> dict[str, Entry]:
    # Built on each call (five entries) so that a test may extend ROSTER with monkeypatch.
    return {e.name: e for e in ROSTER}


def names() -> list[str]:
    """The roster's optimizer names in display order."""
    return [e.name for e in sorted(ROSTER, key=lambda e: e.order)]


def entry(name: str) -> Entry:
    """The roster entry of ``name``; an unknown name gets a neutral entry (role candidate)."""
    known = _by_name().get(name)
    if known is not None:
        return known
    return Entry(name, name, NEUTRAL_COLOR, "candidate", len(ROSTER))


def color(name: str) -> str:
    """The colour of optimizer ``name`` (neutral grey when it is not in the roster)."""
    return entry(name).color


def role(name: str) -> Role:
    """``baseline`` or ``candidate`` (unknown names are candidates)."""
    return entry(name).role


def display_label(label: str, name: str | None = None) -> str:
    """How a run's ``optimizer.label`` is shown: the roster label when the run was not relabelled.

    ``name`` is the run's ``optimizer.name`` (None: assume it equals ``label``).
    """
    known = _by_name()
    if name in (None, label) and label in known:
        return known[label].label
    return label


def rank(label: str, name: str | None = None) -> tuple[int, int, str]:
    """Sort key: roster order of the name, the unrelabelled run first, then the label."""
    name = label if name is None else name
    return (entry(name).order, 0 if label == name else 1, label)
