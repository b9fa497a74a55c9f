"""inline() escapes as _escaped does, and leaves as it is what no escape would change."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from service.cards.markdown import _escaped, inline

# Text none of the escapes can change, as one pattern (a class alternation and a look-ahead).
_ONE_PATTERN = re.compile(
    r"(?![-+=]|\d{1,9}[.)])(?!.*www\.)(?:[^\W_]|[ ,;/()%'\"\-+=.])*", re.IGNORECASE
)
_CHARACTERS = "wW._-+=09)( ,;/%'\":aA@\u0130\u017f\u212a\u2160\u24b6\u00e9"
_STRINGS = ("www.", "WwW.", "1.", "12)", "://", "http://x", "- ", "+1", "==", "\t", "2.9", "1. ")
_PIECES = st.sampled_from(_STRINGS) | st.sampled_from(_CHARACTERS)


@given(st.lists(_PIECES, max_size=8).map("".join) | st.text(max_size=12))
def test_inline_escapes_as_the_escapes_do(value: str) -> None:
    text = " ".join(value.split())
    assert inline(value) == _escaped(text)
    if _ONE_PATTERN.fullmatch(text):  # what the single pattern let through still is
        assert inline(value) == text
