"""Write: each unit's rows become one Parquet part, written by the worker that generated them.

The last stage of the dataset gets exactly one unit per call (one unit = one block end to end),
turns its work rows into the output schema, and publishes the part atomically under its
deterministic name (pipeline/job/plan.py `part_name`): a temporary name under `_tmp/`, then a
move. A final name therefore always holds a complete unit, which is what resume relies on.
Storage faults are retried (`retry:`); if they persist the call fails, the unit stays
uncommitted and the next run redoes it. The stage returns one small commit record per unit:
that is all the driver receives (pipeline/job/runner.py).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.job.config import JobConfig, model_name
from pipeline.job.plan import part_name
from pipeline.job.retry import with_retries
from pipeline.job.rows import WORK_SCHEMA, node_id
from pipeline.job.scoring import quality_sums
from pipeline.job.storage import OutputStore
from schemas.output import (
    META_CONFIG_HASH,
    META_DAMAGE,
    META_LAST_UNIT,
    META_SCHEMA_VERSION,
    META_SOURCE_FILE,
    META_UNIT,
    OUTPUT_SCHEMA,
    SCHEMA_VERSION,
    output_schema,
)

COMMIT_SCHEMA = pa.schema([
    pa.field("part", pa.string()),
    pa.field("source_file", pa.string()),
    pa.field("unit", pa.int64()),
    pa.field("last", pa.bool_()),
    pa.field("damage", pa.string()),
    pa.field("rows", pa.int64()),
    pa.field("ok", pa.int64()),
    pa.field("error", pa.int64()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("output_tokens", pa.int64()),
    pa.field("error_types", pa.string()),  # JSON {error_type: count}
    pa.field("node", pa.string()),  # the Ray node that wrote the part
    pa.field("generated_by", pa.list_(pa.string())),  # the generate actors of its rows
    pa.field("committed_at", pa.float64()),
    pa.field("quality", pa.string()),  # JSON {mask kind or "rows": {count, exact, f1_sum}}
])


def unit_stats(table: pa.Table) -> dict[str, Any]:
    """Counts the manifest reports for one part, from its output columns."""
    errors = table.num_rows - table.column("error_type").null_count
    return {
        "rows": table.num_rows,
        "ok": table.num_rows - errors,
        "error": errors,
        "prompt_tokens": int(pc.sum(table.column("prompt_tokens")).as_py() or 0),
        "output_tokens": int(pc.sum(table.column("output_tokens")).as_py() or 0),
        "error_types": dict(Counter(v for v in table.column("error_type").to_pylist() if v)),
        "quality": quality_sums(table),
    }


def _kept_column(values: list[Any]) -> pa.Array:
    """Arrow infers the type of a kept column; mixed values fall back to JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else json.dumps(v, default=str) for v in values],
                        pa.string())


def assemble(rows: pa.Table, config: JobConfig, config_hash: str, source_uri: str,
             unit: int, last: bool, damage: str | None) -> pa.Table:
    """A unit's work rows -> the output schema, sorted by row, with the kept input columns."""
    rows = rows.sort_by("row_index")
    n = rows.num_rows
    constants = {
        "model": model_name(config.model),
        "engine": str(config.model.engine),
        "multi_mask": str(config.sampling.multi_mask),
    }
    columns = []
    for field in OUTPUT_SCHEMA:
        if field.name in constants:
            columns.append(pa.array([constants[field.name]] * n, field.type))
        else:
            columns.append(rows.column(field.name).cast(field.type))
    keep = config.source.keep_columns
    kept_fields = []
    if keep:
        records = [json.loads(r) for r in rows.column("record").to_pylist()]
        for name in keep:
            array = _kept_column([record.get(name) for record in records])
            columns.append(array)
            kept_fields.append(pa.field(name, array.type))
    metadata = {
        META_SCHEMA_VERSION: SCHEMA_VERSION.encode(),
        META_CONFIG_HASH: config_hash.encode(),
        META_SOURCE_FILE: source_uri.encode(),
        META_UNIT: str(unit).encode(),
        META_LAST_UNIT: b"true" if last else b"false",
    }
    if damage:
        metadata[META_DAMAGE] = damage.encode()
    schema = output_schema(pa.schema(kept_fields)).with_metadata(metadata)
    return pa.Table.from_arrays(columns, schema=schema)


def _commit(store: OutputStore, config: JobConfig, config_hash: str, rows: pa.Table,
            source: str, unit: int, last: bool, damage: str | None) -> dict[str, Any]:
    table = assemble(rows, config, config_hash, source, unit, last, damage)
    name = part_name(source, unit)
    with_retries(lambda: store.write_part(name, table), f"writing {name}", config.retry)
    stats = unit_stats(table)
    return {"part": name, "source_file": source, "unit": unit, "last": last, "damage": damage,
            **stats, "error_types": json.dumps(stats["error_types"]), "node": node_id(),
            "quality": json.dumps(stats["quality"]),
            "generated_by": sorted(set(rows.column("generated_by").drop_null().to_pylist())),
            "committed_at": time.time()}


def write_empty_unit(config: JobConfig, config_hash: str, source: str, unit: int, last: bool,
                     damage: str | None) -> None:
    """Commit a unit that has no rows (an empty file, a range without a line start)."""
    store = OutputStore(config.output.path, config.source.storage)
    _commit(store, config, config_hash, WORK_SCHEMA.empty_table(), source, unit, last, damage)


def _units(batch: pa.Table) -> Iterator[tuple[str, int, pa.Table]]:
    """Every whole unit of a block: (source file, unit index, its rows)."""
    sources = batch.column("source_file")
    for source in pc.unique(sources).to_pylist():
        of_source = batch.filter(pc.equal(sources, source))
        for unit in pc.unique(of_source.column("unit")).to_pylist():
            rows = of_source.filter(pc.equal(of_source.column("unit"), unit))
            expected = rows.column("unit_rows")[0].as_py()
            if rows.num_rows != expected:  # Ray split a unit: never commit part of one
                raise RuntimeError(f"{source} unit {unit}: {rows.num_rows} of {expected} rows "
                                   "arrived together; not committing it")
            yield source, unit, rows


def write_units(batch: pa.Table, job: dict[str, Any], config_hash: str) -> pa.Table:
    """The write stage: commit every unit of the block; return their commit records."""
    config = JobConfig.model_validate(job)
    store = OutputStore(config.output.path, config.source.storage)
    records = [_commit(store, config, config_hash, rows, source, unit,
                       rows.column("unit_last")[0].as_py(), rows.column("unit_damage")[0].as_py())
               for source, unit, rows in _units(batch)]
    return pa.Table.from_pylist(records, schema=COMMIT_SCHEMA)


def output_rows(batch: pa.Table, job: dict[str, Any], config_hash: str) -> pa.Table:
    """The last step of a lazy dataset (`InfillJob.dataset()`): the block's rows in the output
    schema, as the parts would hold them, written nowhere."""
    config = JobConfig.model_validate(job)
    tables = []
    for source, unit, rows in _units(batch):
        damage = rows.column("unit_damage")[0].as_py()
        if damage and not config.source.skip_unreadable_files:
            raise ValueError(f"{source} is damaged after its last complete line ({damage}); "
                             "set source.skip_unreadable_files: true to accept its rows")
        tables.append(assemble(rows, config, config_hash, source, unit, False, damage)
                      .replace_schema_metadata(None))
    return pa.concat_tables(tables)
