"""More adversarial cases (tests/bad_input_cases.py): numpy scalars, bools and huge ints as
numbers; models blockopt cannot probe (sparse embeddings, complex parameters) or that changed
after wrapping; probe closures that break the probe's contract or run out of memory;
checkpoints taken while a probe or a trial runs; state dicts that lost state. Each asserts the
exception and message, or the result and warning of a call that must work."""

from __future__ import annotations

import pytest
from bad_input_cases import MODEL_CASES, NUMBER_CASES, PROBE_CASES, STATE_CASES, Case

CASES = NUMBER_CASES + MODEL_CASES + PROBE_CASES + STATE_CASES


def check_case(case: Case) -> None:
    """``case.call()`` raises ``case.error`` matching ``case.message``, or works (with the
    warning ``case.warns`` matching it, when given) and passes ``case.check``."""
    if case.error is not None:
        with pytest.raises(case.error, match=case.message):
            case.call()
        return
    if case.warns is not None:
        with pytest.warns(case.warns, match=case.message):
            result = case.call()
    else:
        result = case.call()
    if case.check is not None:
        assert case.check(result) is not False


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case(case: Case) -> None:
    check_case(case)


def test_case_ids_are_unique() -> None:
    from bad_input_cases import SECTIONS

    ids = [c.id for section in SECTIONS for c in section.cases]
    assert len(ids) == len(set(ids))
