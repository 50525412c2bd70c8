"""Generate: the stage that fills the prompts, one engine per actor, loaded once.

An engine with continuous batching (vLLM) gets every row of a unit at once, each driven by its
own task (`afill`) with at most `max_in_flight` rows in flight per actor, and concurrent units
share that bound, so the engine stays busy across unit boundaries. Other engines get the rows
through `fill`, `resources.batch_size` at a time.

A row's own problem (a request the engine refuses) comes back as that row's error. Anything
else the engine raises is a fault of the machinery: it propagates, the unit is not committed,
Ray restarts a dead actor and retries its calls, and a fault that persists fails the job.

Each row samples with its own seed, derived from `sampling.seed` and the row's identity (source
file and row index): reproducible run to run, independent of batching and of the actor, and
different rows sample independently. Without `sampling.seed` rows sample without a seed.

A filled row whose policy removed text (`target`) is scored against it here (`scoring.py`):
exact match and token F1 per blank and per row.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from pipeline.engines import make_engine
from pipeline.glm.procedures import FillResult
from pipeline.glm.requests import SamplingParams
from pipeline.job.config import JobConfig, model_dir
from pipeline.job.rows import node_id, release_freed_memory, to_block
from pipeline.job.scoring import score_columns

VLLM_CPU_BIND = "VLLM_CPU_OMP_THREADS_BIND"


class GenerateStage:
    """Fills the prompts of a block; a row's own problem becomes that row's error."""

    def __init__(self, config: dict[str, Any]):
        job = JobConfig.model_validate(config)
        model = job.model
        # vLLM's CPU engine core pins its threads to every core of a NUMA node but one, unless
        # told otherwise; an actor has a share of the node's CPUs (OMP_NUM_THREADS, set by Ray)
        # and no cores of its own, so actors would pin to the same cores (and on 2 cores the
        # model got 1: 136 output tok/s where the OS placing 2 threads gives 183)
        os.environ.setdefault(VLLM_CPU_BIND, "nobind")
        # A batch engine runs one call at a time on its own thread: two units in flight
        # (ActorPoolStrategy) would otherwise compute at once on two pool threads, competing
        # for the same cores and growing the heap with every unit (glibc arenas: +3 MB a
        # unit measured, 0 with one thread). The engine is loaded on that thread too: GNU
        # OpenMP keeps a thread team per thread that computes, and with more team threads
        # than cores it stops spinning between parallel regions (the torch engine ran at
        # 1.5 of 2 cores and took 41 s for rows it fills in 30 s alone).
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.engine = self._engine_thread.submit(
            make_engine, model.engine, model_dir(model), model.dtype, model.device,
            model.engine_options).result()
        self.multi_mask = job.sampling.multi_mask
        self.params = job.sampling.params()
        self.batch_size = job.resources.batch_size
        # Bound to the actor's event loop on first use (Python >= 3.10), not here.
        self._in_flight = asyncio.Semaphore(job.resources.max_in_flight)
        self.worker = f"{node_id()}:{os.getpid()}"

    async def __call__(self, batch: pa.Table) -> pa.Table:
        block = await self._fill_block(batch)
        release_freed_memory()  # the unit's rows are garbage now
        return block

    async def _fill_block(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [row for row in rows if row["error_type"] is None]
        texts = [row["prompt"] for row in todo]
        params = [self.params.for_row(row["source_file"], row["row_index"]) for row in todo]
        if self.engine.continuous_batching:
            results = await asyncio.gather(*(self._fill_one(text, p)
                                             for text, p in zip(texts, params, strict=True)))
        else:
            results = await asyncio.get_running_loop().run_in_executor(
                self._engine_thread, self._fill_batches, texts, params)
        for row, result in zip(todo, results, strict=True):
            _record_fill(row, result)
        for row in rows:
            row["generated_by"] = self.worker
        return to_block(rows)

    async def _fill_one(self, text: str, params: SamplingParams) -> FillResult:
        async with self._in_flight:
            return await self.engine.afill(text, self.multi_mask, params)

    def _fill_batches(self, texts: list[str], params: list[SamplingParams]) -> list[FillResult]:
        """`batch_size` rows per call, rows of similar token counts together, as the engine
        orders the rows of one call (less padding: ordered by characters, 1000 rows took 3.5%
        longer)."""
        order = sorted(range(len(texts)), key=lambda i: self._token_count(texts[i]))
        results: list[FillResult | None] = [None] * len(texts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            filled = self.engine.fill([texts[i] for i in chunk], self.multi_mask,
                                      [params[i] for i in chunk])
            for i, result in zip(chunk, filled, strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    def _token_count(self, text: str) -> int:
        try:
            return len(self.engine.tokenizer.tokenize_ids(text))
        except UnicodeError:  # the engine makes it the row's error
            return 0


def _record_fill(row: dict[str, Any], result: FillResult) -> None:
    """The row's engine columns, and its scores when the policy knows the answers."""
    fills = [dict(mask=f.mask, text=f.text, token_ids=f.token_ids,
                  finish_reason=f.finish_reason) for f in result.fills]
    if result.error_type is None:
        row.update(score_columns([f.text for f in result.fills], row["target"]))
    row.update(
        prompt_token_ids=result.prompt_token_ids,
        fills=fills,
        output_text=result.output_text if result.error_type is None else None,
        prompt_tokens=len(result.prompt_token_ids),
        output_tokens=sum(len(f["token_ids"]) for f in fills),
        error_type=result.error_type,
        error_message=result.error_message,
    )
