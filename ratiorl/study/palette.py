"""One colour per objective / setting / run in every panel: the Okabe-Ito palette (colour-blind
safe; Okabe & Ito 2008, "Color Universal Design") with a stable assignment.

    from ratiorl.study.palette import Palette, colour_for
    pal = Palette(["objective=grpo", "objective=snib"])   # assignment fixed by this order
    pal.colour("objective=snib")     # '#D55E00' (vermillion: snib's preferred colour)
    pal.style("objective=snib")      # {'color': ..., 'marker': ..., 'linestyle': ...}
    colour_for("objective=snib")     # the process-wide palette: same label, same colour, always

A label gets its objective's preferred colour when that colour is still free (so GRPO is blue
and SNIB vermillion in every study that has them), otherwise the first free colour. Past the
eight colours the colours repeat with another line style, so (colour, line style) stays unique
for 32 labels and every label also gets its own marker among the first ten.
"""

from __future__ import annotations

from collections.abc import Iterable

OKABE_ITO = {
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "bluish green": "#009E73",
    "orange": "#E69F00",
    "reddish purple": "#CC79A7",
    "sky blue": "#56B4E9",
    "black": "#000000",
    "yellow": "#F0E442",  # last: the weakest line colour on white
}
COLOURS = tuple(OKABE_ITO.values())
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", ":", "-.")
REFERENCE = "#7f7f7f"  # reference lines (y = x, 1/G, ...): gray, never a series colour
NEUTRAL = "#4d4d4d"  # a quantity that belongs to no series (e.g. a ratio of two of them)

# objective -> index in COLOURS, used while that colour is free
PREFERRED = {"grpo": 0, "snib": 1, "gspo": 2, "ctpo": 3, "dgpo": 4, "sapo": 5, "cispo": 6}

_OBJECTIVE_KEYS = ("objective", "objective.name", "objective_name")


def objective_of(label: str) -> str | None:
    """The objective a label names: ``objective=snib,rollout.num_generations=8`` -> ``snib``,
    ``run-a (gspo)`` -> ``gspo``, ``grpo`` -> ``grpo``; None when it names none."""
    text = str(label).strip()
    if "=" in text:
        for part in text.replace(";", ",").split(","):
            key, _, value = part.partition("=")
            if key.strip().lower() in _OBJECTIVE_KEYS and value.strip():
                return value.strip().lower()
        return None
    if text.endswith(")") and "(" in text:
        return text[text.rindex("(") + 1 : -1].strip().lower() or None
    return text.lower() or None


class Palette:
    """A stable label -> (colour, marker, line style) assignment. ``labels`` are registered in
    order first; later labels are added on first use. ``colours``: a subset of ``COLOURS`` (e.g.
    ``COLOURS[:7]``, without the yellow, for many thin lines)."""

    def __init__(self, labels: Iterable[str] = (), colours: Iterable[str] = COLOURS):
        self._slot: dict[str, int] = {}
        self.colours = tuple(colours)
        for label in labels:
            self.slot(label)

    def slot(self, label: str) -> int:
        label = str(label)
        if label not in self._slot:
            used = set(self._slot.values())
            pref = PREFERRED.get(objective_of(label) or "")
            if pref is None or pref in used or pref >= len(self.colours):
                pref = next(i for i in range(len(used) + 1) if i not in used)
            self._slot[label] = pref
        return self._slot[label]

    @property
    def labels(self) -> list[str]:
        return list(self._slot)

    def colour(self, label: str) -> str:
        return self.colours[self.slot(label) % len(self.colours)]

    def marker(self, label: str) -> str:
        return MARKERS[self.slot(label) % len(MARKERS)]

    def linestyle(self, label: str) -> str:
        return LINESTYLES[(self.slot(label) // len(self.colours)) % len(LINESTYLES)]

    def style(self, label: str) -> dict:
        """Keyword arguments for ``Axes.plot`` / ``Axes.errorbar``."""
        return dict(color=self.colour(label), marker=self.marker(label), linestyle=self.linestyle(label))


_DEFAULT = Palette()


def colour_for(label: str) -> str:
    """The colour of ``label`` in this process's palette: the same label always gets the same
    colour; an objective gets its preferred colour while it is free."""
    return _DEFAULT.colour(label)


def style_for(label: str) -> dict:
    """``colour_for``'s colour with the label's marker and line style."""
    return _DEFAULT.style(label)


__all__ = ["OKABE_ITO", "COLOURS", "MARKERS", "LINESTYLES", "REFERENCE", "NEUTRAL", "PREFERRED", "Palette",
           "objective_of", "colour_for", "style_for"]
