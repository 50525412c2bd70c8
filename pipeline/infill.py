"""GLM blank infilling: the layout of a request and the two multi-mask procedures (spec §6).

An engine does one thing: `SpanRequest` -> `SpanResult`, i.e. given context ids (read
bidirectionally) and a list of blanks, generate one answer per blank, left to right, every
answer starting with `<|startofpiece|>` at (blank position, 1) and seeing the context and all
earlier answers (spec §6.2). The hub single-blank call (§6.1) is the one-blank case.

The procedures are engine-agnostic generators: they yield `SpanRequest`s, receive
`SpanResult`s and return a `FillResult`. `run_procedures` drives many of them against a
batched engine in waves; an async engine drives each one as its own task, so the rounds of
different rows overlap (`drive_async`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Literal, Protocol

from pipeline.tokenization import GMASK, GLMTokenizer

MultiMask = Literal["iterative", "sequential"]
MULTI_MASK_PROCEDURES: tuple[str, ...] = ("iterative", "sequential")


class InfillError(ValueError):
    """Input that cannot be filled; `error_type` is a stable machine-readable code."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-blank decoding settings. temperature 0 means greedy (first-max argmax)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class SpanRequest:
    context_ids: list[int]
    blank_positions: list[int]  # indexes into context_ids, filled in this order
    params: SamplingParams
    record_logits: bool = False  # keep every step's logits (conformance tests)


@dataclasses.dataclass
class SpanResult:
    spans: list[list[int]]  # per blank: answer ids, without <|startofpiece|> and stop token
    finish_reasons: list[str]  # per blank: "stop" or "length"
    stop_ids: list[int | None]  # per blank: the stop token produced, if any
    step_logits: list[list] | None = None  # per blank: one logits row per generated token


@dataclasses.dataclass
class Fill:
    mask: str
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclasses.dataclass
class FillResult:
    text: str
    prompt_token_ids: list[int]
    fills: list[Fill]
    output_text: str
    error_type: str | None = None
    error_message: str | None = None

    def to_json(self) -> dict:
        result = {
            "text": self.text,
            "prompt_token_ids": self.prompt_token_ids,
            "fills": [dataclasses.asdict(f) for f in self.fills],
            "output_text": self.output_text,
        }
        if self.error_type:
            result.update(error_type=self.error_type, error_message=self.error_message)
        return result


class SpanEngine(Protocol):
    """What the procedures need from an engine (torch or vLLM)."""

    tokenizer: GLMTokenizer
    max_sequence_length: int

    def generate_spans(self, requests: Sequence[SpanRequest]) -> list[SpanResult]: ...


Procedure = Generator[SpanRequest, SpanResult, FillResult]


def mask_positions(tokenizer: GLMTokenizer, ids: Sequence[int]) -> list[int]:
    masks = set(tokenizer.mask_token_ids)
    return [i for i, token in enumerate(ids) if token in masks]


def check_fits(ids: Sequence[int], params: SamplingParams, max_sequence_length: int) -> None:
    """GLM's position tables bound the context length and the block positions (spec §8)."""
    if len(ids) > max_sequence_length:
        raise InfillError(
            "too_long",
            f"prompt is {len(ids)} tokens; the model's max_sequence_length is "
            f"{max_sequence_length}",
        )
    if params.max_new_tokens > max_sequence_length:
        raise InfillError(
            "too_long",
            f"max_new_tokens {params.max_new_tokens} exceeds the model's max_sequence_length "
            f"{max_sequence_length} (block positions)",
        )


def _require_mask(tokenizer: GLMTokenizer, ids: Sequence[int]) -> list[int]:
    positions = mask_positions(tokenizer, ids)
    if not positions:
        names = ", ".join(tokenizer.mask_names.values())
        raise InfillError("no_mask", f"text has no mask token ({names})")
    return positions


def _fill(tokenizer: GLMTokenizer, mask_id: int, span: list[int], reason: str) -> Fill:
    return Fill(tokenizer.mask_names[mask_id], tokenizer.decode(span), span, reason)


def iterative(tokenizer: GLMTokenizer, text: str, params: SamplingParams,
              max_sequence_length: int, record_logits: bool = False) -> Procedure:
    """Hub single-blank call repeated; each answer spliced in place of its mask (spec §6.3)."""
    ids = tokenizer.encode(text)
    prompt_ids = list(ids)
    fills: list[Fill] = []
    positions = _require_mask(tokenizer, ids)
    while positions:
        check_fits(ids, params, max_sequence_length)
        position = positions[0]
        result = yield SpanRequest(list(ids), [position], params, record_logits)
        span = result.spans[0]
        fills.append(_fill(tokenizer, ids[position], span, result.finish_reasons[0]))
        ids = ids[:position] + span + ids[position + 1:]
        positions = mask_positions(tokenizer, ids[position + len(span):])
        positions = [position + len(span) + p for p in positions]
    output = tokenizer.decode(ids[1:-1])  # without the [CLS] and eos the encoding added
    return FillResult(text, prompt_ids, fills, output)


def sequential(tokenizer: GLMTokenizer, text: str, params: SamplingParams,
               max_sequence_length: int, record_logits: bool = False) -> Procedure:
    """THUDM/GLM `generate_samples.py`: one context, all blanks left to right (spec §6.2)."""
    ids = tokenizer.encode_original(text)
    positions = _require_mask(tokenizer, ids)
    check_fits(ids, params, max_sequence_length)
    result = yield SpanRequest(list(ids), positions, params, record_logits)
    fills = [_fill(tokenizer, ids[p], span, reason)
             for p, span, reason in zip(positions, result.spans, result.finish_reasons,
                                        strict=True)]
    spans = dict(zip(positions, result.spans, strict=True))
    body_end = len(ids) if text.endswith(GMASK) else len(ids) - 1  # no [CLS], no eos
    filled = [t for i in range(1, body_end) for t in spans.get(i, [ids[i]])]
    output = tokenizer.decode(filled)
    return FillResult(text, ids, fills, output)


PROCEDURES: dict[str, Callable[..., Procedure]] = {
    "iterative": iterative,
    "sequential": sequential,
}


def error_result(text: str, err: Exception) -> FillResult:
    error_type = getattr(err, "error_type", type(err).__name__)
    return FillResult(text, [], [], "", error_type=error_type, error_message=str(err))


def start_procedure(engine: SpanEngine, text: str, multi_mask: str, params: SamplingParams,
                    record_logits: bool = False) -> Procedure:
    if multi_mask not in PROCEDURES:
        raise ValueError(f"multi_mask must be one of {', '.join(PROCEDURES)}, got {multi_mask!r}")
    return PROCEDURES[multi_mask](engine.tokenizer, text, params, engine.max_sequence_length,
                                  record_logits)


def run_procedures(engine: SpanEngine, texts: Sequence[str], multi_mask: str = "iterative",
                   params: SamplingParams | None = None,
                   record_logits: bool = False) -> list[FillResult]:
    """Fill many texts on a batched engine: every wave sends each live row's next request."""
    params = params or SamplingParams()
    results: list[FillResult | None] = [None] * len(texts)
    live: dict[int, tuple[Procedure, SpanRequest]] = {}

    def advance(i: int, procedure: Procedure, reply: SpanResult | None) -> None:
        try:
            request = next(procedure) if reply is None else procedure.send(reply)
        except StopIteration as stop:
            results[i] = stop.value
            live.pop(i, None)
        except InfillError as err:
            results[i] = error_result(texts[i], err)
            live.pop(i, None)
        else:
            live[i] = (procedure, request)

    for i, text in enumerate(texts):
        advance(i, start_procedure(engine, text, multi_mask, params, record_logits), None)
    while live:
        wave = list(live.items())
        replies = engine.generate_spans([request for _, (_, request) in wave])
        for (i, (procedure, _)), reply in zip(wave, replies, strict=True):
            advance(i, procedure, reply)
    return [r for r in results if r is not None]


async def drive_async(procedure: Procedure, text: str,
                      generate: Callable[[SpanRequest], Awaitable[SpanResult]]) -> FillResult:
    """Run one row's procedure against an async engine (one awaited request per round)."""
    try:
        request = next(procedure)
        while True:
            request = procedure.send(await generate(request))
    except StopIteration as stop:
        return stop.value
    except InfillError as err:
        return error_result(text, err)
