"""What an engine is asked and what it answers: one row's blanks (docs/glm.md, "Requests").

A `SpanRequest` is GLM context ids (read bidirectionally) and the positions of the blanks to
fill, in order; the `SpanResult` holds one generated span per blank. Every span starts with
`<|startofpiece|>` at (blank position, 1) and sees the context and all earlier spans; the hub's
single-blank call is the one-blank case. `check_request` is the validation every engine applies,
so the same bad request gets the same error whichever engine runs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import ErrorType


class InfillError(ValueError):
    """Input that cannot be filled; `error_type` is the code the output row carries."""

    def __init__(self, error_type: ErrorType, message: str):
        super().__init__(message)
        self.error_type = ErrorType(error_type)


class MultiMask(StrEnum):
    """How a text with several blanks is filled (docs/glm.md, "Several blanks")."""

    ITERATIVE = "iterative"
    SEQUENTIAL = "sequential"


class SamplingSettings(BaseModel):
    """Per-blank decoding settings that a job (`sampling:`) or `fill` chooses; the one
    definition of their defaults and bounds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(32, ge=1, description="tokens per blank, the stop token counted")
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy (first-max argmax)")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 keeps all")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int | None = Field(None, description="sampling seed (unset: not reproducible)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def for_row(self, *identity: object) -> Self:
        """These settings with a seed of the row's own, derived from `seed` and the row's
        identity (SHA-256, the same in every process): reproducible, independent of batching,
        and different rows sample independently. Unchanged without a seed."""
        if self.seed is None:
            return self
        text = "\x00".join(str(part) for part in (self.seed, *identity))
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        return self.model_copy(update={"seed": int.from_bytes(digest[:8], "big") >> 1})


class SamplingParams(SamplingSettings):
    """What an engine is asked per blank: the settings, and `ignore_eos`, which only benchmarks
    set. It is not a setting of jobs or `fill`: a job's `sampling:` section and `fill`'s flags
    are the `SamplingSettings`, so job configs (and their hashes) never hold it."""

    ignore_eos: bool = Field(False, description="keep generating past stop tokens until "
                             "max_new_tokens (benchmarks, like vLLM's --ignore-eos)")


@dataclasses.dataclass(frozen=True)
class SpanRequest:
    context_ids: list[int]
    blank_positions: list[int]  # indexes into context_ids, filled in this order
    params: SamplingParams


@dataclasses.dataclass
class SpanResult:
    spans: list[list[int]]  # per blank: answer ids, without <|startofpiece|> and stop token
    finish_reasons: list[str]  # per blank: "stop" or "length"
    stop_ids: list[int | None]  # per blank: the stop token produced, if any
    step_logits: list[list] | None = None  # per blank, when the engine records logits


def check_fits(ids: list[int], params: SamplingParams, max_sequence_length: int) -> None:
    """GLM's position tables bound the context length and the block positions."""
    if len(ids) > max_sequence_length:
        raise InfillError(ErrorType.TOO_LONG, f"prompt is {len(ids)} tokens; the model's "
                          f"max_sequence_length is {max_sequence_length}")
    if params.max_new_tokens > max_sequence_length:
        raise InfillError(ErrorType.TOO_LONG, f"max_new_tokens {params.max_new_tokens} exceeds "
                          f"the model's max_sequence_length {max_sequence_length} "
                          "(block positions)")


def check_request(request: SpanRequest, vocab_size: int, max_sequence_length: int) -> None:
    """Reject what GLM cannot fill, for this request only (InfillError)."""
    if not request.blank_positions:
        raise InfillError(ErrorType.NO_MASK, "request has no blank to fill")
    outside = [p for p in request.blank_positions if not 0 <= p < len(request.context_ids)]
    if outside:
        raise InfillError(ErrorType.BAD_REQUEST, f"blank positions {outside} are outside the "
                          f"{len(request.context_ids)}-token context")
    if any(not 0 <= t < vocab_size for t in request.context_ids):
        raise InfillError(ErrorType.BAD_REQUEST, f"context ids must lie in [0, {vocab_size})")
    check_fits(request.context_ids, request.params, max_sequence_length)
