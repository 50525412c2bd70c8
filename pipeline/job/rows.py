"""The work rows that flow between the stages, and the checks every input row goes through.

Every stage takes and returns Arrow blocks in `WORK_SCHEMA`, one row per input row, and fills
in only its own columns. A row that already carries an `error_type` passes through untouched.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from pipeline.glm.requests import InfillError
from schemas.errors import ErrorType
from schemas.output import OUTPUT_SCHEMA

# The job's constants, added when a part is written.
JOB_COLUMNS = ("model", "engine", "multi_mask")

# The output columns that vary per row, nullable while a row is in flight, plus what the
# stages pass along.
WORK_SCHEMA = pa.schema([
    *(field.with_nullable(True) for field in OUTPUT_SCHEMA if field.name not in JOB_COLUMNS),
    pa.field("unit", pa.int64()),  # the work unit (pipeline/job/plan.py) within source_file
    pa.field("unit_rows", pa.int64()),  # rows of the whole unit: the writer checks them
    pa.field("unit_last", pa.bool_()),  # the last unit of a compressed file
    pa.field("unit_damage", pa.string()),  # why a compressed file ends early
    pa.field("generated_by", pa.string()),  # the generate actor (node:pid), for the manifest
    pa.field("record", pa.string()),  # the input row's selected columns as JSON
])


def to_block(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rows -> a block with the fixed schema, so blocks of all stages concatenate."""
    return pa.Table.from_pylist(list(rows), schema=WORK_SCHEMA)


def release_freed_memory() -> None:
    """Hand the heap memory freed by a unit's rows back to the system (glibc `malloc_trim`).

    A stage turns each unit of ~20k rows into Python dicts and back; glibc keeps the freed
    pages and, fragmented, they grew a generate actor by ~8 MB per unit without end (USS 702 ->
    818 MiB over 13 units, flat at ~550 MiB with the trim; `benchmarks/bench_data_plane.py
    memory`). A no-op where the C library is not glibc."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def node_id() -> str:
    """The Ray node this code runs on (short form; "local" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id()[:12] if ray.is_initialized() else "local"


def require_text(record: dict[str, Any], column: str) -> str:
    """The row's text, or an InfillError that says why there is none."""
    text = record.get(column)
    if text is None:
        raise InfillError(ErrorType.MISSING_TEXT, f"text column {column!r} is missing or null")
    if not isinstance(text, str):
        raise InfillError(ErrorType.WRONG_TYPE, f"text column {column!r} holds a "
                          f"{type(text).__name__}, expected a string")
    if not text.strip():
        raise InfillError(ErrorType.EMPTY_TEXT, f"text column {column!r} is empty")
    return text


def read_target(record: dict[str, Any], column: str) -> list[str] | None:
    """The answers a pre-masked row brings along (`source.target_column`): a list of strings,
    or such a list as JSON text (a string column); null means none. Anything else is the
    row's own error."""
    value = record.get(column)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = ...
    if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise InfillError(ErrorType.WRONG_TYPE, f"target column {column!r} must hold a list of "
                      f"strings (one answer per blank), got {record.get(column)!r:.80}")


def parse_json_record(raw: bytes) -> dict[str, Any]:
    """One JSON Lines line as its record, or an InfillError saying why it is none (not
    UTF-8, not JSON, not an object): the job's reader and `glm-infill fill` judge alike."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InfillError(ErrorType.INVALID_UTF8, f"the line is not UTF-8: {err}") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InfillError(ErrorType.INVALID_JSON, f"the line is not JSON: {err}") from None
    if not isinstance(record, dict):
        raise InfillError(ErrorType.INVALID_JSON,
                          f"expected a JSON object, got {type(record).__name__}")
    return record
