"""Name screens: before a pattern of drug or diagnosis names is searched for in a text (a
search of the whole alternation costs about ten times as much), plain substring tests rule out
the texts in which no name occurs at all, which is most of a chart.

Only patterns whose names are all ASCII have a screen (remember_plain): for them the lower-cased
text, with the few other characters a case-insensitive pattern reads as ASCII letters mapped
first, holds every name the pattern can match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

NEVER = re.compile(r"(?!)")  # a pattern of no names: it never matches

# For search_names: the names each pattern matches, in lower case, as plain text; only ASCII
# names, whose case-insensitive matches are known (below). A pattern not here is always searched.
# Keyed by id() (a pattern's hash is computed anew each time), the pattern kept to make it safe.
_PLAIN_NAMES: dict[int, tuple[re.Pattern[str], tuple[str, ...]]] = {id(NEVER): (NEVER, ())}
# The characters other than A-Z that a case-insensitive pattern matches to an ASCII letter:
# dotted and dotless I, long S and the Kelvin sign. Mapped first, so lower() finds every name.
_FOLD_TO_ASCII = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})


def search_names(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    """`pattern.search(text)`, the text first screened if the pattern has a screen."""
    names = plain_names(pattern)
    if names is not None and not names_in(names, _folded(text)):
        return None
    return pattern.search(text)


def none_named(names: tuple[str, ...] | None, texts: list[str]) -> bool:
    """True when search_names finds no name in any of `texts`, for a pattern whose plain names
    are `names` (None: not known), told by a single screen of them joined (a name in one of them
    is in the joined text); False when unsure."""
    if names is None or not texts:
        return names is not None
    return not names_in(names, folded_for_screen(texts))


def folded_for_screen(texts: list[str]) -> str:
    """Texts joined and folded as a name screen reads them, for no_name_in_folded: texts
    screened for several value sets are folded once."""
    return _folded("\n".join(texts))


def no_name_in_folded(pattern: re.Pattern[str], folded: str) -> bool:
    """none_named for `pattern`, given folded_for_screen(texts)."""
    names = plain_names(pattern)
    return names is not None and not names_in(names, folded)


def _folded(text: str) -> str:
    return (text if text.isascii() else text.translate(_FOLD_TO_ASCII)).lower()


# Texts up to this long have their screen remembered (_remembered_names_in). Medication and
# condition texts come from a small vocabulary that recurs across charts ("apixaban 5 mg oral
# twice daily"), and a screen is one substring test per name (23 for the drug groups):
# remembered, a chart's 30 orders are screened in a few us instead of 35.
_SCREEN_MEMO_CHARS = 256


def names_in(names: tuple[str, ...], folded: str) -> bool:
    if len(folded) > _SCREEN_MEMO_CHARS:
        return _any_name_in(names, folded)
    return _remembered_names_in(names, folded)


def _any_name_in(names: tuple[str, ...], folded: str) -> bool:
    return any(map(folded.__contains__, names))


_remembered_names_in = lru_cache(maxsize=4096)(_any_name_in)


def remember_plain(pattern: re.Pattern[str], names: Iterable[str]) -> None:
    _PLAIN_NAMES[id(pattern)] = (pattern, _shortest_cover(names))


def plain_names(pattern: re.Pattern[str]) -> tuple[str, ...] | None:
    known = _PLAIN_NAMES.get(id(pattern))
    return known[1] if known is not None and known[0] is pattern else None


def _shortest_cover(names: Iterable[str]) -> tuple[str, ...]:
    """The names that hold no other one: a text holding any name holds one of these."""
    kept: list[str] = []
    for name in sorted(set(names), key=len):
        if not any(shorter in name for shorter in kept):
            kept.append(name)
    return tuple(kept)
