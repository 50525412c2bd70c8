"""The two multi-mask procedures, as engine-agnostic generators (docs/glm.md, "Several blanks").

A procedure yields `SpanRequest`s, receives `SpanResult`s and returns a `FillResult`; an engine
drives it (`InfillEngine.fill` in waves for a batch, `InfillEngine.afill` one row per task), so
the same procedure runs on every engine.

* `iterative`: the hub's single-blank call repeated; each answer is spliced into the ids in place
  of its mask and the next round reads it as ordinary context.
* `sequential`: THUDM/GLM `generate_samples.py`: one bidirectional pass over the context, then
  the blanks left to right, each span attending to all earlier spans.

Both return `output_text` as the input text with each blank replaced by its answer
(`splice_fills`): the user's own string, not a decoding of the ids, so nothing else of the text
changes (no spaces added around Chinese, no normalised punctuation, no unknown-character marks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator

from pipeline.glm.requests import (
    InfillError,
    MultiMask,
    SamplingParams,
    SpanRequest,
    SpanResult,
    check_fits,
)
from pipeline.glm.tokenization import GLMTokenizer
from schemas.errors import ErrorType


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
    error_type: ErrorType | None = None
    error_message: str | None = None

    def to_json(self) -> dict:
        """The `glm-infill fill` JSON line (a stable contract)."""
        result = {
            "text": self.text,
            "prompt_token_ids": self.prompt_token_ids,
            "fills": [dataclasses.asdict(f) for f in self.fills],
            "output_text": self.output_text,
        }
        if self.error_type:
            result.update(error_type=str(self.error_type), error_message=self.error_message)
        return result

    @classmethod
    def failed(cls, text: str, err: InfillError) -> FillResult:
        return cls(text, [], [], "", error_type=err.error_type, error_message=str(err))


Procedure = Generator[SpanRequest, SpanResult, FillResult]


def mask_positions(tokenizer: GLMTokenizer, ids: list[int]) -> list[int]:
    masks = set(tokenizer.mask_token_ids)
    return [i for i, token in enumerate(ids) if token in masks]


def _require_mask(tokenizer: GLMTokenizer, ids: list[int]) -> list[int]:
    positions = mask_positions(tokenizer, ids)
    if not positions:
        names = ", ".join(tokenizer.mask_names.values())
        raise InfillError(ErrorType.NO_MASK, f"text has no mask token ({names})")
    return positions


def replace_spans(text: str, spans: list[tuple[int, int]], replacements: list[str]) -> str:
    """`text` with each (sorted, disjoint) [start, end) span replaced by its replacement."""
    parts, cursor = [], 0
    for (start, end), replacement in zip(spans, replacements, strict=True):
        parts += [text[cursor:start], replacement]
        cursor = end
    parts.append(text[cursor:])
    return "".join(parts)


def splice_fills(tokenizer: GLMTokenizer, text: str, fills: list[Fill]) -> str:
    """The k-th blank written in `text` replaced by the k-th fill's text, and nothing else
    changed: whitespace the tokenizer strips next to a mask token stays, as does every
    character the vocabulary lacks."""
    return replace_spans(text, tokenizer.mask_spans(text), [fill.text for fill in fills])


def _fill(tokenizer: GLMTokenizer, mask_id: int, span: list[int], reason: str) -> Fill:
    return Fill(tokenizer.mask_names[mask_id], tokenizer.decode(span), span, reason)


def iterative(tokenizer: GLMTokenizer, text: str, params: SamplingParams,
              max_sequence_length: int) -> Procedure:
    """Hub single-blank call repeated; each answer spliced in place of its mask."""
    ids = tokenizer.encode(text)
    prompt_ids = list(ids)
    fills: list[Fill] = []
    positions = _require_mask(tokenizer, ids)
    while positions:
        check_fits(ids, params, max_sequence_length)
        position = positions[0]
        result = yield SpanRequest(list(ids), [position], params)
        span = result.spans[0]
        fills.append(_fill(tokenizer, ids[position], span, result.finish_reasons[0]))
        ids = ids[:position] + span + ids[position + 1:]
        positions = mask_positions(tokenizer, ids[position + len(span):])
        positions = [position + len(span) + p for p in positions]
    return FillResult(text, prompt_ids, fills, splice_fills(tokenizer, text, fills))


def sequential(tokenizer: GLMTokenizer, text: str, params: SamplingParams,
               max_sequence_length: int) -> Procedure:
    """THUDM/GLM `generate_samples.py`: one context, all blanks left to right."""
    ids = tokenizer.encode_original(text)
    positions = _require_mask(tokenizer, ids)
    check_fits(ids, params, max_sequence_length)
    result = yield SpanRequest(list(ids), positions, params)
    fills = [_fill(tokenizer, ids[p], span, reason)
             for p, span, reason in zip(positions, result.spans, result.finish_reasons,
                                        strict=True)]
    return FillResult(text, ids, fills, splice_fills(tokenizer, text, fills))


PROCEDURES: dict[MultiMask, Callable[..., Procedure]] = {
    MultiMask.ITERATIVE: iterative,
    MultiMask.SEQUENTIAL: sequential,
}


def start_procedure(tokenizer: GLMTokenizer, max_sequence_length: int, text: str,
                    multi_mask: MultiMask, params: SamplingParams) -> Procedure:
    return PROCEDURES[MultiMask(multi_mask)](tokenizer, text, params, max_sequence_length)
