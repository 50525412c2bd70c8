"""The Ray Data stages of a job: read shards, build prompts, generate fills.

Every stage takes and returns Arrow blocks in `WORK_SCHEMA`, one row per input row, and only
fills in its own columns. A row that already carries an `error_type` passes through untouched;
a row that fails in a stage gets its `error_type` there. Nothing a single row does can fail
the dataset: errors are caught per row, because Ray Data fails the whole job on one UDF
exception (and `max_errored_blocks` would silently drop blocks).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from pipeline.config import JobConfig, ModelConfig, SourceConfig
from pipeline.infill import (
    FillResult,
    SamplingParams,
    drive_async,
    error_result,
    run_procedures,
    start_procedure,
)
from schemas.output import OUTPUT_SCHEMA

logger = logging.getLogger(__name__)

# the output columns that vary per row (model, engine and multi_mask are the job's constants,
# added at write time), nullable while a row is in flight, plus what the stages pass along
WORK_SCHEMA = pa.schema([
    *(field.with_nullable(True) for field in OUTPUT_SCHEMA
      if field.name not in ("model", "engine", "multi_mask")),
    pa.field("shard_rows", pa.int64()),  # rows of the whole shard: tells the writer it is done
    pa.field("text", pa.string()),
    pa.field("record", pa.string()),  # the input row's selected columns as JSON
])


def to_block(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rows -> a block with the fixed schema, so blocks of all stages concatenate."""
    return pa.Table.from_pylist(list(rows), schema=WORK_SCHEMA)


def model_dir(model: ModelConfig, demo_dir: str) -> str:
    """The checkpoint to load; the demo one is (re)built where the stage runs if missing."""
    if model.path is not None:
        return model.path
    from pipeline.demo import ensure_demo_checkpoint

    return str(ensure_demo_checkpoint(demo_dir))


def read_shards(batch: pa.Table, source: dict[str, Any]) -> pa.Table:
    """Read stage (a Ray task per shard): the rows of each file named in `batch["uri"]`."""
    from pipeline.sources import read_shard

    config = SourceConfig.model_validate(source)
    rows: list[dict[str, Any]] = []
    for uri in batch.column("uri").to_pylist():
        shard = read_shard(uri, config)
        for row in shard:
            row["record"] = json.dumps(row["record"], ensure_ascii=False, default=str)
            row["shard_rows"] = len(shard)
        rows += shard
    return to_block(rows)


class PromptStage:
    """Builds each row's GLM prompt with the configured policy; the tokenizer loads once."""

    def __init__(self, config: dict[str, Any], demo_dir: str):
        from pipeline.checkpoint import load_config
        from pipeline.prompts import build_prompt
        from pipeline.tokenization import load_tokenizer

        job = JobConfig.model_validate(config)
        path = model_dir(job.model, demo_dir)
        self.build_prompt = build_prompt
        self.prompt = job.prompt
        self.text_column = job.source.text_column
        self.tokenizer = load_tokenizer(path)
        self.max_sequence_length = load_config(path).max_sequence_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for row in rows:
            if row["error_type"] is None:
                self._build(row)
        return to_block(rows)

    def _build(self, row: dict[str, Any]) -> None:
        try:
            result = self.build_prompt(json.loads(row["record"]), self.prompt, self.tokenizer,
                                       self.max_sequence_length, self.text_column, row["id"])
        except Exception as err:  # a policy bug must not take the batch down
            row.update(error_type="prompt_error", error_message=f"{type(err).__name__}: {err}")
            return
        row.update(prompt=result.text, target=result.target,
                   budget_action=result.budget_action)
        if result.error_type:
            row.update(error_type=result.error_type, error_message=result.error_message)


class GenerateStage:
    """Fills the prompts on one engine per actor, loaded once.

    An async engine (`agenerate_span`) gets every row of the batch at once, each driven by
    its own task with at most `max_in_flight` rows in flight per actor, and concurrent
    batches share that bound, so the engine stays busy across batch boundaries. A batched
    engine gets the batch through `run_procedures`, one batch at a time.
    """

    def __init__(self, config: dict[str, Any], demo_dir: str):
        from pipeline.engines import make_engine

        job = JobConfig.model_validate(config)
        model = job.model
        self.engine = make_engine(model.engine, model_dir(model, demo_dir), model.dtype,
                                  model.device, **model.engine_options)
        self.multi_mask = job.prompt.multi_mask
        self.params = SamplingParams(**job.sampling.model_dump())
        self.is_async = hasattr(self.engine, "agenerate_span")
        # Bound to the actor's event loop on first use (Python >= 3.10), not here.
        self._in_flight = asyncio.Semaphore(job.resources.max_in_flight)
        self._engine_lock = asyncio.Lock()

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [row for row in rows if row["error_type"] is None]
        texts = [row["prompt"] for row in todo]
        if self.is_async:
            results = await asyncio.gather(*(self._fill_async(text) for text in texts))
        else:
            async with self._engine_lock:
                results = await asyncio.to_thread(self._fill_batch, texts)
        for row, result in zip(todo, results, strict=True):
            _record_fill(row, result)
        return to_block(rows)

    async def _fill_async(self, text: str) -> FillResult:
        async with self._in_flight:
            try:
                procedure = start_procedure(self.engine, text, self.multi_mask, self.params)
                return await drive_async(procedure, text, self.engine.agenerate_span)
            except Exception as err:
                return error_result(text, err)

    def _fill_batch(self, texts: list[str]) -> list[FillResult]:
        """The whole batch at once; if that fails, row by row so only bad rows get errors."""
        try:
            return run_procedures(self.engine, texts, self.multi_mask, self.params)
        except Exception as err:
            logger.warning("batch of %d rows failed (%s: %s); retrying row by row",
                           len(texts), type(err).__name__, err)
        return [self._fill_one(text) for text in texts]

    def _fill_one(self, text: str) -> FillResult:
        try:
            return run_procedures(self.engine, [text], self.multi_mask, self.params)[0]
        except Exception as err:
            return error_result(text, err)


def _record_fill(row: dict[str, Any], result: FillResult) -> None:
    fills = [dict(mask=f.mask, text=f.text, token_ids=f.token_ids,
                  finish_reason=f.finish_reason) for f in result.fills]
    row.update(
        prompt_token_ids=result.prompt_token_ids,
        fills=fills,
        output_text=result.output_text if result.error_type is None else None,
        prompt_tokens=len(result.prompt_token_ids),
        output_tokens=sum(len(f["token_ids"]) for f in fills),
        error_type=result.error_type,
        error_message=result.error_message,
    )
