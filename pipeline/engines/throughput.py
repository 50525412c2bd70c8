"""An engine's generation speed on a set of texts: what `glm-infill bench` and benchmarks/ time.

Only generation is timed: the caller starts the engine, one text is filled to warm it up, then
every text is filled, the way each engine is best used: all together in waves (`fill`) on an
engine that batches per call (torch), each text its own task (`afill`) on one that batches
continuously (vLLM), so that rows and rounds overlap. Tokens are counted per request: the
context ids of every request (an `iterative` row's later rounds read the context again) and
every generated token, a stop token included, so both engines count the same work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Sequence

from pipeline.engines.base import InfillEngine
from pipeline.glm.procedures import FillResult
from pipeline.glm.requests import InfillError, MultiMask, SamplingParams, SpanRequest, SpanResult


def share_cores_with_vllm() -> None:
    """On a CPU: vLLM's engine core in this process, with as many threads as torch (vLLM drops
    torch to one thread unless OMP_NUM_THREADS says otherwise), so both engines get the same
    cores. Call before any engine starts; settings already made are kept."""
    import torch

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


@dataclasses.dataclass
class Throughput:
    """One timed run of an engine."""

    engine: str
    elapsed_s: float
    output_tokens: int
    total_tokens: int  # context tokens of every request + output tokens
    fills: list[list[list[int]]]  # per text, per blank: the answer ids (to compare engines)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return self.total_tokens / self.elapsed_s

    def to_json(self) -> dict[str, str | int | float]:
        return {"engine": self.engine, "elapsed_s": self.elapsed_s,
                "output_tokens": self.output_tokens, "total_tokens": self.total_tokens,
                "output_tokens_per_s": self.output_tokens_per_s,
                "total_tokens_per_s": self.total_tokens_per_s}


class CountingEngine(InfillEngine):
    """An engine in front of another that counts the context and generated tokens of what it
    answers; `fill` and `afill` (the contract's) run through it unchanged."""

    def __init__(self, engine: InfillEngine):
        super().__init__()
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.config = engine.config
        self.context_tokens = 0
        self.output_tokens = 0

    def _count(self, request: SpanRequest, result: SpanResult) -> SpanResult:
        self.context_tokens += len(request.context_ids)
        self.output_tokens += sum(len(span) + (stop is not None)
                                  for span, stop in zip(result.spans, result.stop_ids,
                                                        strict=True))
        return result

    def check(self, request: SpanRequest) -> None:
        self.engine.check(request)

    def generate(self, requests: Sequence[SpanRequest]) -> list[SpanResult]:
        return [self._count(r, s) for r, s in zip(requests, self.engine.generate(requests),
                                                   strict=True)]

    async def agenerate(self, request: SpanRequest) -> SpanResult:
        return self._count(request, await self.engine.agenerate(request))

    def close(self) -> None:
        """The wrapped engine belongs to the caller."""


def fill_all(engine: CountingEngine, texts: list[str], multi_mask: MultiMask,
             params: SamplingParams) -> list[FillResult]:
    """Rows together in waves (`fill`), or each row its own task (`afill`) on an engine that
    batches continuously."""
    if not engine.engine.continuous_batching:
        return engine.fill(texts, multi_mask, params)

    async def each_its_own_task() -> list[FillResult]:
        return list(await asyncio.gather(*(engine.afill(text, multi_mask, params)
                                           for text in texts)))

    return asyncio.run(each_its_own_task())


def _require_filled(results: list[FillResult]) -> None:
    """The first text that could not be filled, as its InfillError (the workload is wrong)."""
    for number, result in enumerate(results, 1):
        if result.error_type:
            raise InfillError(result.error_type, f"text {number}: {result.error_message}")


def measure(engine: InfillEngine, texts: list[str], multi_mask: MultiMask,
            params: SamplingParams, warm_up: str | None = None) -> Throughput:
    """Fill `warm_up` (default: the first text), then time filling them all. Raises the
    InfillError of a text that cannot be filled. On an engine with prefix caching (vLLM) the
    warm-up text should not be one of `texts`: the timed run would find its prompt cached
    (measured: 9 instead of 201 prefill tokens, ~4% of a 16-prompt run)."""
    _require_filled(fill_all(CountingEngine(engine), [warm_up or texts[0]], multi_mask, params))
    counted = CountingEngine(engine)
    start = time.perf_counter()
    results = fill_all(counted, texts, multi_mask, params)
    elapsed = time.perf_counter() - start
    _require_filled(results)
    return Throughput(str(engine.name), elapsed, counted.output_tokens,
                      counted.context_tokens + counted.output_tokens,
                      [[fill.token_ids for fill in result.fills] for result in results])
