"""What the run report shows, gathered from an output folder in bounded memory.

The manifest gives the run's figures, config, versions, quality and each part's commit time;
the parts give the per-row counts. Parts are read a batch at a time and only in the columns
counted (one field of `fills` at a time, never its text), and every count is kept as a tally of
distinct values (token counts are bounded by the model's length), so a 1M-row output costs no
more memory than a small one.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.job.storage import MANIFEST, OutputStore

FILL = "fills.list.element"
PART_COLUMNS = ["error_type", "prompt_tokens", "output_tokens", f"{FILL}.mask",
                f"{FILL}.token_ids", f"{FILL}.finish_reason"]
BATCH_ROWS = 8192
MAX_TIME_BINS = 40
OK = "ok"
MANIFEST_KEYS = {"config_hash", "started_at", "parts"}  # what every glm-infill manifest has


class NotAnOutput(ValueError):
    """The folder holds no glm-infill manifest."""


def _value_counts(values: pa.Array) -> Counter:
    counted = pc.value_counts(values.drop_null())
    return Counter(dict(zip(counted.field("values").to_pylist(),
                            counted.field("counts").to_pylist(), strict=True)))


def _pair_counts(first: pa.Array, second: pa.Array) -> Counter:
    """How often each (first, second) pair occurs."""
    grouped = pa.table({"a": first, "b": second}).group_by(["a", "b"]).aggregate(
        [([], "count_all")])
    pairs = zip(grouped.column("a").to_pylist(), grouped.column("b").to_pylist(), strict=True)
    return Counter(dict(zip(pairs, grouped.column("count_all").to_pylist(), strict=True)))


@dataclasses.dataclass
class RowCounts:
    """Tallies over every row of the output, added a batch at a time."""

    outcomes: Counter = dataclasses.field(default_factory=Counter)  # "ok" or error_type
    prompt_tokens: Counter = dataclasses.field(default_factory=Counter)  # ok rows by length
    output_tokens: Counter = dataclasses.field(default_factory=Counter)  # ok rows by tokens
    answer_tokens: Counter = dataclasses.field(default_factory=Counter)  # (mask, length)
    finish_reasons: Counter = dataclasses.field(default_factory=Counter)  # (mask, reason)

    def add(self, batch: pa.RecordBatch) -> None:
        errors = batch.column("error_type")
        self.outcomes.update(_value_counts(pc.fill_null(errors, OK)))
        ok = batch.filter(pc.is_null(errors))
        self.prompt_tokens.update(_value_counts(ok.column("prompt_tokens")))
        self.output_tokens.update(_value_counts(ok.column("output_tokens")))
        fills = pc.list_flatten(ok.column("fills"))
        masks = pc.struct_field(fills, "mask")
        self.answer_tokens.update(_pair_counts(
            masks, pc.list_value_length(pc.struct_field(fills, "token_ids"))))
        self.finish_reasons.update(_pair_counts(masks, pc.struct_field(fills, "finish_reason")))

    @property
    def rows(self) -> int:
        return sum(self.outcomes.values())


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Rows and output tokens per second of the parts committed in the last run, in equal time
    bins from its start, and the rows committed so far at each commit."""

    edges_s: list[float]
    rows_per_s: list[float]
    tokens_per_s: list[float]
    commits_s: list[float]
    rows_done: list[int]


def throughput(manifest: dict[str, Any]) -> Throughput | None:
    """From the parts' commit times (None when no part of the last run has one)."""
    started = manifest["started_at"]
    commits = sorted((max(part["committed_at"] - started, 0.0), part["rows"],
                      part["output_tokens"]) for part in manifest["parts"].values()
                     if part.get("committed_at") is not None)
    if not commits:
        return None
    bins = min(MAX_TIME_BINS, len(commits))
    width = max(commits[-1][0], 1e-3) / bins
    rows, tokens = [0] * bins, [0] * bins
    for at, part_rows, part_tokens in commits:
        index = min(int(at / width), bins - 1)
        rows[index] += part_rows
        tokens[index] += part_tokens
    return Throughput(edges_s=[i * width for i in range(bins + 1)],
                      rows_per_s=[r / width for r in rows],
                      tokens_per_s=[t / width for t in tokens],
                      commits_s=[at for at, _, _ in commits],
                      rows_done=list(itertools.accumulate(r for _, r, _ in commits)))


@dataclasses.dataclass(frozen=True)
class RunData:
    """Everything the page shows."""

    manifest: dict[str, Any]
    counts: RowCounts
    throughput: Throughput | None
    parts_read: int
    made_at: float

    @property
    def quality(self) -> dict[str, dict[str, Any]]:
        """The manifest's quality by mask kind ({} when nothing was scored)."""
        return self.manifest.get("quality") or {}


def read_manifest(store: OutputStore) -> dict[str, Any]:
    try:
        manifest = store.read_manifest()
    except ValueError as err:  # not JSON
        raise NotAnOutput(f"{store.uri}/{MANIFEST} is not a glm-infill manifest ({err})"
                          ) from err
    if manifest is None:
        raise NotAnOutput(f"{store.uri} is not a glm-infill output: it has no {MANIFEST}")
    if not isinstance(manifest, dict) or not manifest.keys() >= MANIFEST_KEYS:
        raise NotAnOutput(f"{store.uri}/{MANIFEST} is not a glm-infill manifest")
    return manifest


def count_rows(store: OutputStore, parts: list[str]) -> RowCounts:
    counts = RowCounts()
    for name in parts:
        for batch in store.iter_part(name, PART_COLUMNS, BATCH_ROWS):
            counts.add(batch)
    return counts


def collect(store: OutputStore) -> RunData:
    """The report's data: the manifest, and the committed parts as they are now (the parts
    are the truth; the manifest of a job still running lags behind them)."""
    manifest = read_manifest(store)
    parts = sorted(store.part_names())
    return RunData(manifest=manifest, counts=count_rows(store, parts),
                   throughput=throughput(manifest), parts_read=len(parts), made_at=time.time())
