"""Requests: SamplingParams bounds and defaults, and the validation every engine applies."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.glm.requests import (
    InfillError,
    MultiMask,
    SamplingParams,
    SpanRequest,
    check_fits,
    check_request,
)
from schemas.errors import ErrorType

VOCAB, MAX_LEN = 1024, 16


def test_sampling_defaults() -> None:
    params = SamplingParams()
    assert (params.max_new_tokens, params.temperature, params.top_k, params.top_p,
            params.seed) == (32, 0.0, 0, 1.0, None)
    assert params.greedy
    assert not SamplingParams(temperature=0.5).greedy


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("max_new_tokens", -3), ("temperature", -0.1), ("top_k", -1),
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.01), ("nucleus", 0.9),
])
def test_sampling_bounds(field: str, value: float) -> None:
    with pytest.raises(ValidationError) as err:
        SamplingParams(**{field: value})
    assert err.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 1), ("temperature", 0.0), ("top_k", 0), ("top_p", 1.0),
    ("top_p", 1e-6), ("seed", 0),
])
def test_sampling_edges_are_allowed(field: str, value: float) -> None:
    assert getattr(SamplingParams(**{field: value}), field) == value


def test_sampling_params_are_frozen_keyword_only_values() -> None:
    params = SamplingParams(max_new_tokens=4, seed=3)
    with pytest.raises(ValidationError):
        params.seed = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        SamplingParams(4)  # type: ignore[misc]
    assert params == SamplingParams(seed=3, max_new_tokens=4)
    assert hash(params) == hash(SamplingParams(seed=3, max_new_tokens=4))


def test_multi_mask_names() -> None:
    assert [str(m) for m in MultiMask] == ["iterative", "sequential"]


def request(context: list[int], blanks: list[int], max_new_tokens: int = 4) -> SpanRequest:
    return SpanRequest(context, blanks, SamplingParams(max_new_tokens=max_new_tokens))


@pytest.mark.parametrize("bad, code, message", [
    (request([1, 2, 3], []), ErrorType.NO_MASK, "no blank"),
    (request([1, 2, 3], [3]), ErrorType.BAD_REQUEST, r"\[3\] are outside the 3-token"),
    (request([1, 2, 3], [-1]), ErrorType.BAD_REQUEST, "outside"),
    (request([1, VOCAB, 3], [1]), ErrorType.BAD_REQUEST, r"\[0, 1024\)"),
    (request([1, -2, 3], [1]), ErrorType.BAD_REQUEST, r"\[0, 1024\)"),
    (request([5] * (MAX_LEN + 1), [0]), ErrorType.TOO_LONG, "prompt is 17 tokens"),
    (request([1, 2, 3], [1], max_new_tokens=MAX_LEN + 1), ErrorType.TOO_LONG,
     "block positions"),
], ids=["no-blank", "blank-past-end", "negative-blank", "id-at-vocab-size", "negative-id",
        "context-too-long", "answer-too-long"])
def test_check_request_rejects(bad: SpanRequest, code: ErrorType, message: str) -> None:
    with pytest.raises(InfillError, match=message) as err:
        check_request(bad, VOCAB, MAX_LEN)
    assert err.value.error_type is code


def test_check_request_order_of_checks() -> None:
    """A request with several faults gets the first: no blank, then bounds, then length."""
    with pytest.raises(InfillError) as err:
        check_request(request([VOCAB] * (MAX_LEN + 1), []), VOCAB, MAX_LEN)
    assert err.value.error_type is ErrorType.NO_MASK
    with pytest.raises(InfillError) as err:
        check_request(request([VOCAB] * (MAX_LEN + 1), [0]), VOCAB, MAX_LEN)
    assert err.value.error_type is ErrorType.BAD_REQUEST


@pytest.mark.parametrize("good", [
    request([0, 1, VOCAB - 1], [0]),
    request([1, 2, 3], [2, 0, 1]),
    request([5] * MAX_LEN, [MAX_LEN - 1], max_new_tokens=MAX_LEN),
])
def test_check_request_accepts(good: SpanRequest) -> None:
    check_request(good, VOCAB, MAX_LEN)


def test_check_fits_and_error_codes() -> None:
    check_fits([1] * MAX_LEN, SamplingParams(max_new_tokens=MAX_LEN), MAX_LEN)
    with pytest.raises(InfillError) as err:
        check_fits([1] * (MAX_LEN + 1), SamplingParams(), MAX_LEN)
    assert err.value.error_type == "too_long"
    assert isinstance(err.value, ValueError)
    with pytest.raises(ValueError):
        InfillError("not_a_code", "x")  # type: ignore[arg-type]


def test_for_row_derives_a_seed_per_row() -> None:
    params = SamplingParams(temperature=0.9, seed=7)
    first, again = params.for_row("a.jsonl", 3), params.for_row("a.jsonl", 3)
    assert first == again and first.seed != params.seed
    seeds = {params.for_row("a.jsonl", i).seed for i in range(200)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert params.for_row("b.jsonl", 3).seed != first.seed
    assert SamplingParams(seed=8).for_row("a.jsonl", 3).seed != first.seed
    assert first.temperature == 0.9  # only the seed changes
    unseeded = SamplingParams(temperature=0.9)
    assert unseeded.for_row("a.jsonl", 3) is unseeded
