"""The output Parquet schema: one part file per work unit, one row per input row.

Bump SCHEMA_VERSION on any change that a reader could notice (a column added, removed,
renamed or retyped); it is stored in every file's metadata and in the run manifest.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "2"

FILL_TYPE = pa.struct([
    pa.field("mask", pa.string()),
    pa.field("text", pa.string()),
    pa.field("token_ids", pa.list_(pa.int32())),
    pa.field("finish_reason", pa.string()),
])

OUTPUT_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("source_file", pa.string(), nullable=False),
    pa.field("row_index", pa.int64(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("prompt_token_ids", pa.list_(pa.int32())),
    pa.field("fills", pa.list_(FILL_TYPE)),
    pa.field("output_text", pa.string()),
    pa.field("target", pa.list_(pa.string())),
    pa.field("blank_exact_match", pa.list_(pa.bool_())),
    pa.field("blank_token_f1", pa.list_(pa.float64())),
    pa.field("exact_match", pa.bool_()),
    pa.field("token_f1", pa.float64()),
    pa.field("budget_action", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("output_tokens", pa.int32()),
    pa.field("model", pa.string()),
    pa.field("engine", pa.string()),
    pa.field("multi_mask", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
])

# Keys of the Parquet key-value metadata of every output file.
META_SCHEMA_VERSION = b"glm_infill.schema_version"
META_CONFIG_HASH = b"glm_infill.config_hash"
META_SOURCE_FILE = b"glm_infill.source_file"
META_UNIT = b"glm_infill.unit"  # the unit's number within its source file
META_LAST_UNIT = b"glm_infill.last_unit"  # "true" on the last unit of a compressed file
META_DAMAGE = b"glm_infill.damage"  # why a compressed file ends early (its last unit)


def output_schema(kept_columns: pa.Schema | None = None) -> pa.Schema:
    """The fixed columns followed by the input columns the job keeps (`source.keep_columns`)."""
    fields = list(OUTPUT_SCHEMA)
    if kept_columns is not None:
        fields += list(kept_columns)
    return pa.schema(fields)
