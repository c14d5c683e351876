"""The fast character check of codes agrees with CODE_PATTERN, the rule the API documents."""

from __future__ import annotations

import re

from hypothesis import example, given
from hypothesis import strategies as st

from gateway.atp.schemas import CODE_PATTERN, is_code

_PATTERN = re.compile(CODE_PATTERN)
_ALPHABET = st.sampled_from("Aa0._:-/ \n\t\x00\x7fÄ\u2028{}") | st.characters()


@given(st.text(_ALPHABET, min_size=1, max_size=64))
@example("SKU-1\n")
@example("-")
@example("a b")
def test_is_code_is_the_pattern_within_its_length(text: str) -> None:
    assert is_code(text) == bool(_PATTERN.match(text))
