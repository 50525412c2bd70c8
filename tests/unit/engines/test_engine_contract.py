"""The engine contract (pipeline/engines/base.py) on both real engines: the same bad request gets
the same error however it is sent, options are typed per engine, results carry no logits unless
asked, `close` is idempotent, batching and per-text params do not change answers.

A tiny random checkpoint (no ../shared): max_sequence_length 256, vocabulary 1024. The vLLM
engine runs in-process, one at a time (EngineSlot), and is closed at module end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.engines import engine_options, make_engine
from pipeline.engines.base import EngineName, InfillEngine, TorchOptions, VLLMOptions
from pipeline.engines.torch_engine import TorchEngine
from pipeline.glm.procedures import FillResult
from pipeline.glm.requests import InfillError, MultiMask, SamplingParams, SpanRequest
from pipeline.glm.tokenization import load_tokenizer
from schemas.errors import ErrorType
from tests.fixtures import make_tiny_checkpoint
from tests.unit.engines.vllm_helpers import (
    TOLERANCE,
    EngineSlot,
    compare,
    random_requests,
)

MAX_LEN, VOCAB = 256, 1024
CLS, MASK, EOS = 1002, 1003, 1000  # the demo tokenizer's ids
CONTEXT = [CLS, 5, MASK, 23, EOS]
PARAMS = SamplingParams(max_new_tokens=4)
BAD_REQUESTS = {  # name: (request, error code, words of the message)
    "no-blank": (SpanRequest(CONTEXT, [], PARAMS), ErrorType.NO_MASK, "no blank"),
    "blank-outside-context": (SpanRequest(CONTEXT, [len(CONTEXT)], PARAMS),
                              ErrorType.BAD_REQUEST, "outside the 5-token context"),
    "id-not-in-vocabulary": (SpanRequest([CLS, VOCAB, MASK, EOS], [2], PARAMS),
                             ErrorType.BAD_REQUEST, "context ids must lie in [0, 1024)"),
    "context-too-long": (SpanRequest([CLS, *[5] * MAX_LEN, MASK, EOS], [MAX_LEN + 1], PARAMS),
                         ErrorType.TOO_LONG, "max_sequence_length is 256"),
    "answer-too-long": (SpanRequest(CONTEXT, [2], SamplingParams(max_new_tokens=MAX_LEN + 1)),
                        ErrorType.TOO_LONG, "block positions"),
}
BAD_TEXTS = {  # what `fill` can meet in texts: (text, params, error code)
    "no-mask": ("no blank here", PARAMS, ErrorType.NO_MASK),
    "context-too-long": ("w " * 300 + "[MASK]", PARAMS, ErrorType.TOO_LONG),
    "answer-too-long": ("a [MASK] b", SamplingParams(max_new_tokens=MAX_LEN + 1),
                        ErrorType.TOO_LONG),
    # a lone surrogate: a non-UTF-8 byte in a command-line argument (tokenizers crash on it)
    "not-unicode": ("bad \udcff [MASK]", PARAMS, ErrorType.INVALID_TEXT),
}
TEXTS = ["Tsinghua University is located in [MASK] and was founded in 1911.",
         "The file is opened in [MASK] mode and [MASK] is returned to the caller.",
         "Question: what does the sort method do? Answer: [gMASK]",
         "北京是中国的首都，[MASK]是最大的城市，[MASK]也很有名。"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights of std 0.05 (greedy picks clear of ties), whose answers run to their
    length limit (so max_new_tokens shows in every fill)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("glm-contract"), initializer_range=0.05)


@pytest.fixture(scope="module")
def torch_infill(model: Path) -> Iterator[TorchEngine]:
    with TorchEngine(model, device="cpu") as engine:
        yield engine


@pytest.fixture
def vllm_infill(slot: EngineSlot, model: Path) -> InfillEngine:
    pytest.importorskip("vllm")
    return slot.get(model, record_logits=False)


@pytest.fixture(params=list(EngineName))
def engine(request: pytest.FixtureRequest) -> InfillEngine:
    return request.getfixturevalue(f"{request.param}_infill")


def error_of(call) -> tuple[ErrorType, str]:
    with pytest.raises(InfillError) as err:
        call()
    return err.value.error_type, str(err.value)


def rows(results: list[FillResult]) -> list[dict]:
    return [r.to_json() for r in results]


# -- the same bad request, the same error ----------------------------------------------------

@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_check_codes(engine: InfillEngine, name: str) -> None:
    request, code, words = BAD_REQUESTS[name]
    error_type, message = error_of(lambda: engine.check(request))
    assert error_type is code and words in message


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_generate_raises_the_check_error(engine: InfillEngine, name: str) -> None:
    request, code, _ = BAD_REQUESTS[name]
    assert error_of(lambda: engine.generate([request])) == error_of(lambda: engine.check(request))


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_agenerate_raises_the_check_error(engine: InfillEngine, name: str) -> None:
    request, code, _ = BAD_REQUESTS[name]
    assert error_of(lambda: asyncio.run(engine.agenerate(request))) == (
        error_of(lambda: engine.check(request)))


def send(engine: InfillEngine, way: str, request: SpanRequest) -> tuple[ErrorType, str]:
    """The error a bad request gets through `check`, `generate` or `agenerate`."""
    calls = {"check": lambda: engine.check(request),
             "generate": lambda: engine.generate([request]),
             "agenerate": lambda: asyncio.run(engine.agenerate(request))}
    return error_of(calls[way])


def test_both_engines_give_the_same_errors(torch_infill: TorchEngine,
                                           vllm_infill: InfillEngine) -> None:
    for request, code, _ in BAD_REQUESTS.values():
        for way in ("check", "generate", "agenerate"):
            expected = send(torch_infill, way, request)
            assert expected[0] is code
            assert send(vllm_infill, way, request) == expected, way


def test_fill_turns_errors_into_rows(engine: InfillEngine) -> None:
    """Bad texts become error rows in place; the good rows around them are filled as alone."""
    bad = list(BAD_TEXTS.values())
    texts = [TEXTS[0], *(t for t, _, _ in bad), TEXTS[1]]
    params = [PARAMS, *(p for _, p, _ in bad), PARAMS]
    results = engine.fill(texts, MultiMask.ITERATIVE, params)
    assert [r.error_type for r in results] == [None, *(c for _, _, c in bad), None]
    for result in results[1:-1]:
        assert (result.prompt_token_ids, result.fills, result.output_text) == ([], [], "")
        assert result.error_message
    assert rows([results[0], results[-1]]) == rows(engine.fill([TEXTS[0], TEXTS[1]],
                                                               params=PARAMS))
    assert results[1].text == bad[0][0]


@pytest.mark.parametrize("multi_mask", list(MultiMask))
def test_afill_turns_errors_into_rows(engine: InfillEngine, multi_mask: MultiMask) -> None:
    async def fill_all() -> list[FillResult]:
        return await asyncio.gather(*(engine.afill(text, multi_mask, params)
                                      for text, params, _ in BAD_TEXTS.values()))

    results = asyncio.run(fill_all())
    assert [r.error_type for r in results] == [c for _, _, c in BAD_TEXTS.values()]
    assert rows(results) == rows(engine.fill([t for t, _, _ in BAD_TEXTS.values()], multi_mask,
                                             [p for _, p, _ in BAD_TEXTS.values()]))


# -- results ---------------------------------------------------------------------------------

def test_no_step_logits_unless_recorded(engine: InfillEngine) -> None:
    requests = random_requests(engine.tokenizer, 3, seed=6)
    results = engine.generate(requests)
    assert [r.step_logits for r in results] == [None] * 3
    assert all(len(r.spans) == len(q.blank_positions) for r, q in zip(results, requests,
                                                                    strict=True))
    assert asyncio.run(engine.agenerate(requests[0])).step_logits is None


def test_engines_agree_without_logits(torch_infill: TorchEngine,
                                      vllm_infill: InfillEngine) -> None:
    requests = random_requests(torch_infill.tokenizer, 6, seed=7)
    expected, actual = torch_infill.generate(requests), vllm_infill.generate(requests)
    assert [(r.spans, r.stop_ids, r.finish_reasons) for r in actual] == [
        (r.spans, r.stop_ids, r.finish_reasons) for r in expected]
    for multi_mask in MultiMask:
        assert rows(vllm_infill.fill(TEXTS, multi_mask)) == rows(
            torch_infill.fill(TEXTS, multi_mask))


def test_per_text_params(engine: InfillEngine) -> None:
    """A list of params is one per text: each row is filled as if alone with its own."""
    params = [SamplingParams(max_new_tokens=n) for n in (1, 3, 6, 2)]
    for multi_mask in MultiMask:
        together = engine.fill(TEXTS, multi_mask, params)
        alone = [engine.fill([text], multi_mask, p)[0] for text, p in zip(TEXTS, params,
                                                                           strict=True)]
        assert rows(together) == rows(alone)
        for result, p in zip(together, params, strict=True):
            assert result.error_type is None and result.fills
            for fill in result.fills:
                produced = len(fill.token_ids) + (fill.finish_reason == "stop")
                assert produced <= p.max_new_tokens
                assert fill.finish_reason == "stop" or len(fill.token_ids) == p.max_new_tokens
    lengths = {len(f.token_ids) for r in engine.fill(TEXTS, params=params) for f in r.fills
               if f.finish_reason == "length"}
    assert len(lengths) > 1  # the per-text limits really differ
    with pytest.raises(ValueError, match="2 sampling params for 4 texts"):
        engine.fill(TEXTS, params=params[:2])


# -- options ---------------------------------------------------------------------------------

def test_options_are_typed_per_engine(model: Path) -> None:
    with pytest.raises(ValidationError, match="max_num_seqs"):
        make_engine("torch", model, options={"max_num_seqs": 4})
    with pytest.raises(ValidationError, match="max_batch_size"):
        engine_options("torch", {"max_batch_size": 0})
    with pytest.raises(TypeError, match="not options of the vllm engine"):
        engine_options("vllm", TorchOptions())
    assert engine_options("vllm", {"max_num_seqs": 2}) == VLLMOptions(max_num_seqs=2)
    assert engine_options(EngineName.TORCH, None) == TorchOptions(max_batch_size=16)
    with make_engine("torch", model, "float32", "cpu", {"max_batch_size": 3}) as engine:
        assert isinstance(engine, TorchEngine) and engine.max_batch_size == 3
        assert not engine.continuous_batching


def test_torch_batch_size_does_not_change_results(model: Path) -> None:
    requests = random_requests(load_tokenizer(model), 5, seed=8)
    results = {}
    for size in (2, 16):
        with TorchEngine(model, options=TorchOptions(max_batch_size=size),
                         record_logits=True) as engine:
            results[size] = engine.generate(requests)
            fills = rows(engine.fill(TEXTS, MultiMask.SEQUENTIAL))
            results[size, "fill"] = fills
    assert compare(results[16], results[2]) < TOLERANCE
    assert results[2, "fill"] == results[16, "fill"]


# -- close -----------------------------------------------------------------------------------

def assert_bad_input_never_reaches_the_model(engine: InfillEngine) -> None:
    """On a closed engine: bad texts and requests still get their errors (no model used)."""
    texts = [t for t, _, _ in BAD_TEXTS.values()]
    params = [p for _, p, _ in BAD_TEXTS.values()]
    assert [r.error_type for r in engine.fill(texts, params=params)] == [
        c for _, _, c in BAD_TEXTS.values()]
    assert asyncio.run(engine.afill(texts[0])).error_type is ErrorType.NO_MASK
    for request, code, _ in BAD_REQUESTS.values():
        assert error_of(lambda r=request: engine.generate([r]))[0] is code


def test_torch_close_is_idempotent_and_checks_still_answer(model: Path) -> None:
    engine = TorchEngine(model)
    with engine:
        pass
    engine.close()
    engine.close()
    assert engine.model is None
    # bad rows never reach the (released) model
    assert_bad_input_never_reaches_the_model(engine)


def test_vllm_close_is_idempotent_and_checks_still_answer(slot: EngineSlot,
                                                          vllm_infill: InfillEngine,
                                                          model: Path) -> None:
    assert vllm_infill.continuous_batching
    vllm_infill.close()
    vllm_infill.close()
    assert_bad_input_never_reaches_the_model(vllm_infill)
    slot.close()  # a third close
    # closing released the process's in-process slot: another engine may open
    reopened = slot.get(model, record_logits=False)
    assert reopened is not vllm_infill
    [result] = reopened.fill([TEXTS[0]])
    assert result.error_type is None
