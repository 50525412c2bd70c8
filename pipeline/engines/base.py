"""The engine contract: what both engines implement and what the job and the CLI rely on.

An engine answers `SpanRequest`s (pipeline/glm/requests.py) in two ways: `generate` for a batch
(blocking) and `agenerate` for one request (awaitable, so many rows can be in flight). On top of
those, `fill` and `afill` drive whole texts through a multi-mask procedure. Both engines validate
requests with the same `check_request`, so the same bad request gets the same error; a request
that fails validation becomes that row's error and never reaches the model.

Engine options are typed per engine (`TorchOptions`, `VLLMOptions`); the job config, the CLI
flags and `make_engine` all read them from `ENGINE_OPTIONS`. An engine that cannot start raises
`EngineStartError` (`EngineConfigError` when a setting is what it refused), whose message is
one line naming the cause.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import Sequence
from enum import StrEnum
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.engines.onednn import bound_kernel_caches
from pipeline.glm.checkpoint import GLMConfig
from pipeline.glm.procedures import FillResult, Procedure, start_procedure
from pipeline.glm.requests import (
    InfillError,
    MultiMask,
    SamplingParams,
    SpanRequest,
    SpanResult,
    check_request,
)
from pipeline.glm.tokenization import GLMTokenizer
from schemas.errors import ErrorType

GiB = 2**30


class EngineName(StrEnum):
    TORCH = "torch"
    VLLM = "vllm"


class EngineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TorchOptions(EngineOptions):
    max_batch_size: int = Field(16, ge=1, description="requests decoded together in one batch")


class VLLMOptions(EngineOptions):
    max_num_seqs: int = Field(64, ge=1, description="sequences vLLM schedules at once")
    kv_cache_gb: float | None = Field(None, gt=0, description="KV cache size in GiB per rank "
                                      "(CPU default: a tenth of the available memory, at most "
                                      "4 GiB; GPU default: from gpu_memory_utilization)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs (or CPU ranks) per engine")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of GPU memory "
                                          "vLLM may take (GPU only)")
    max_model_len: int | None = Field(None, ge=1, description="longest prompt + answers "
                                      "(default: twice max_sequence_length)")
    attention_backend: str | None = Field(None, description="vLLM attention backend (CUDA)")
    execution: Literal["auto", "eager", "compiled"] = Field(
        "auto", description="eager: PyTorch eager mode; compiled: torch.compile, and CUDA "
        "graphs on a GPU (a cold start compiles first); auto: eager on the CPU, compiled on "
        "a GPU")

    @property
    def kv_cache_bytes(self) -> int | None:
        """`kv_cache_gb` in bytes, as vLLM takes it."""
        return None if self.kv_cache_gb is None else int(self.kv_cache_gb * GiB)


class EngineStartError(RuntimeError):
    """The engine could not start; the message is one line naming the cause, so that a command
    or a job can report it as is. Raised as such: the machine failed it (a device, a process that
    died)."""


class EngineConfigError(EngineStartError):
    """The engine could not start with these settings (an option value, a dtype, a device, more
    memory than the machine has): changing the configuration fixes it."""


def check_kv_cache_fits(per_rank: int, ranks: int, available: int) -> None:
    """A CPU KV cache of `per_rank` bytes on each of `ranks` ranks that the `available` memory
    cannot hold: refused (EngineConfigError) before vLLM spends a minute finding out."""
    if per_rank * ranks > available:
        each = f" ({per_rank / GiB:.1f} GiB on each of {ranks} ranks)" if ranks > 1 else ""
        raise EngineConfigError(
            f"a KV cache of {per_rank * ranks / GiB:.1f} GiB{each} is more than the "
            f"{available / GiB:.1f} GiB of memory available; lower kv_cache_gb")


MAX_LINE = 500  # characters of an error reported in one line


def one_line(err: BaseException) -> str:
    """`Type: message` on one line, for an error that is reported in one line."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:MAX_LINE]


ENGINE_OPTIONS: dict[EngineName, type[EngineOptions]] = {
    EngineName.TORCH: TorchOptions,
    EngineName.VLLM: VLLMOptions,
}

Params = SamplingParams | Sequence[SamplingParams]
GREEDY = SamplingParams()


def _require_unicode(text: str) -> None:
    """Raise InfillError for text that is not valid Unicode (lone surrogates: bytes that were
    not UTF-8 in a command-line argument, or a `\\ud800` JSON escape); tokenizers crash on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InfillError(ErrorType.INVALID_TEXT, f"text is not valid Unicode ({err.reason} at "
                          f"character {err.start})") from None


def _per_text(params: Params, count: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"{len(params)} sampling params for {count} texts")
    return list(params)


class InfillEngine(abc.ABC):
    """A GLM engine. Subclasses set `tokenizer` and `config` and implement `generate`."""

    name: ClassVar[EngineName]
    # True: rows are best sent one by one with `afill` (the engine batches them itself);
    # False: rows are best sent together with `fill`.
    continuous_batching: ClassVar[bool] = False
    tokenizer: GLMTokenizer
    config: GLMConfig

    def __init__(self) -> None:
        bound_kernel_caches()  # before the model loads: see onednn.py
        self._generate_lock = threading.Lock()

    @property
    def max_sequence_length(self) -> int:
        return self.config.max_sequence_length

    def check(self, request: SpanRequest) -> None:
        """Raise InfillError when this request cannot be filled (never touches the model)."""
        check_request(request, self.config.vocab_size, self.max_sequence_length)

    @abc.abstractmethod
    def generate(self, requests: Sequence[SpanRequest]) -> list[SpanResult]:
        """Answer checked requests together (blocking)."""

    async def agenerate(self, request: SpanRequest) -> SpanResult:
        """Answer one request; by default `generate` on a worker thread, one call at a time."""
        self.check(request)

        def run() -> SpanResult:
            with self._generate_lock:
                return self.generate([request])[0]

        return await asyncio.to_thread(run)

    @abc.abstractmethod
    def close(self) -> None:
        """Release the engine's resources (processes, threads, memory); idempotent."""

    def __enter__(self) -> InfillEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, text: str, multi_mask: MultiMask, params: SamplingParams) -> Procedure:
        """The text's procedure; invalid text fails at its first step, like any bad input."""
        _require_unicode(text)
        return (yield from start_procedure(self.tokenizer, self.max_sequence_length, text,
                                           multi_mask, params))

    def fill(self, texts: Sequence[str], multi_mask: MultiMask = MultiMask.ITERATIVE,
             params: Params = GREEDY) -> list[FillResult]:
        """Fill many texts: every wave sends each live row's next request in one batch."""
        results: list[FillResult | None] = [None] * len(texts)
        live: dict[int, tuple[Procedure, SpanRequest]] = {}

        def advance(i: int, procedure: Procedure, reply: SpanResult | None) -> None:
            try:
                request = next(procedure) if reply is None else procedure.send(reply)
                self.check(request)
            except StopIteration as stop:
                results[i] = stop.value
                live.pop(i, None)
            except InfillError as err:
                results[i] = FillResult.failed(texts[i], err)
                live.pop(i, None)
            else:
                live[i] = (procedure, request)

        for i, (text, row_params) in enumerate(zip(texts, _per_text(params, len(texts)),
                                                   strict=True)):
            advance(i, self._start(text, multi_mask, row_params), None)
        while live:
            wave = list(live.items())
            with self._generate_lock:
                replies = self.generate([request for _, (_, request) in wave])
            for (i, (procedure, _)), reply in zip(wave, replies, strict=True):
                advance(i, procedure, reply)
        return [r for r in results if r is not None]

    async def afill(self, text: str, multi_mask: MultiMask = MultiMask.ITERATIVE,
                    params: SamplingParams = GREEDY) -> FillResult:
        """Fill one text, one awaited request per round (rows overlap on a batching engine)."""
        procedure = self._start(text, multi_mask, params)
        try:
            request = next(procedure)
            while True:
                request = procedure.send(await self.agenerate(request))
        except StopIteration as stop:
            return stop.value
        except InfillError as err:
            return FillResult.failed(text, err)
