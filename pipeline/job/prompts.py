"""Prompts: the stage that turns each read row into a GLM prompt (policies in `policies.py`)."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipeline.glm.checkpoint import load_config
from pipeline.glm.tokenization import load_tokenizer
from pipeline.job.config import JobConfig, model_dir
from pipeline.job.policies import build_prompt
from pipeline.job.rows import release_freed_memory, to_block
from schemas.errors import ErrorType


class PromptStage:
    """Builds each row's prompt with the configured policy; the tokenizer loads once.

    Nothing a single row does can fail the block: a policy that raises (a bug) gives that row
    `prompt_error`, because Ray Data fails the whole job on one exception in a stage.
    """

    def __init__(self, config: dict[str, Any]):
        job = JobConfig.model_validate(config)
        path = model_dir(job.model)
        self.prompt = job.prompt
        self.text_column = job.source.text_column
        self.target_column = job.source.target_column
        self.tokenizer = load_tokenizer(path)
        self.max_sequence_length = load_config(path).max_sequence_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        block = self._build_block(batch)
        release_freed_memory()  # the unit's rows are garbage now
        return block

    def _build_block(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for row in rows:
            if row["error_type"] is None:
                self._build(row)
        return to_block(rows)

    def _build(self, row: dict[str, Any]) -> None:
        try:
            result = build_prompt(json.loads(row["record"]), self.prompt, self.tokenizer,
                                  self.max_sequence_length, self.text_column, row["id"],
                                  self.target_column)
        except Exception as err:  # a policy bug must not take the block down
            row.update(error_type=ErrorType.PROMPT_ERROR,
                       error_message=f"{type(err).__name__}: {err}")
            return
        row.update(prompt=result.text, target=result.target,
                   budget_action=result.budget_action)
        if result.error_type:
            row.update(error_type=result.error_type, error_message=result.error_message)
