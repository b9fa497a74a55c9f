"""inline() leaves text as it is exactly when the single pattern it was written as says so."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from service.cards.markdown import _escaped, inline

# Text none of the escapes can change, as one pattern (a class alternation and a look-ahead).
_ONE_PATTERN = re.compile(
    r"(?![-+=]|\d{1,9}[.)])(?!.*www\.)(?:[^\W_]|[ ,;/()%'\"\-+=.])*", re.IGNORECASE
)
_PIECES = st.sampled_from(
    [*"wW._-+=09)( ,;/%'\":aA\u0130\u017f\u212a\u2160\u24b6\u00e9", "www.", "WwW.", "1.", "12)"]
)


@given(st.lists(_PIECES, max_size=8).map("".join) | st.text(max_size=12))
def test_inline_leaves_text_as_it_is_only_when_the_one_pattern_does(value: str) -> None:
    text = " ".join(value.split())
    expected = text if _ONE_PATTERN.fullmatch(text) else _escaped(text)
    assert inline(value) == expected
