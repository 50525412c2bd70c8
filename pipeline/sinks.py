"""Writing results: one Parquet file per input shard, committed atomically, plus a manifest.

The driver is the only writer. Rows stream in from the generate stage in any order; a shard
is committed once all its rows have arrived: the file is written under `_tmp/` and then
moved to its final, deterministic name `part-<hash of the source uri>-<basename>.parquet`.
A final name therefore always holds a complete shard, which is what resume relies on: a
re-run skips every shard whose final file exists (and was made by the same config), and
`_tmp/` leftovers of a killed run are removed. Every file records the config hash and the
schema version in its Parquet metadata; `_manifest.json` summarises the run.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import JobConfig
from pipeline.demo import DEMO_NAME
from pipeline.sources import resolve
from pipeline.stages import WORK_SCHEMA
from schemas.output import (
    META_CONFIG_HASH,
    META_SCHEMA_VERSION,
    META_SOURCE_FILE,
    OUTPUT_SCHEMA,
    SCHEMA_VERSION,
    output_schema,
)

MANIFEST = "_manifest.json"
TMP_DIR = "_tmp"
PART_RE = re.compile(r"^part-[0-9a-f]{16}-.*\.parquet$")


class OutputError(RuntimeError):
    """The output location holds results this job must not mix with its own."""


def part_name(source_uri: str) -> str:
    """The final file name of a shard: stable across runs, unique per source file."""
    digest = hashlib.sha256(source_uri.encode()).hexdigest()[:16]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", posixpath.basename(source_uri))
    base = re.sub(r"\.(parquet|pq|jsonl|ndjson|json)(\.gz|\.zst)?$", "", base)
    return f"part-{digest}-{base}.parquet"


def shard_stats(table: pa.Table) -> dict[str, int]:
    """Counts a manifest reports for one shard, from its output columns."""
    errors = table.num_rows - table.column("error_type").null_count
    return {
        "rows": table.num_rows,
        "ok": table.num_rows - errors,
        "error": errors,
        "prompt_tokens": int(pc.sum(table.column("prompt_tokens")).as_py() or 0),
        "output_tokens": int(pc.sum(table.column("output_tokens")).as_py() or 0),
    }


class OutputStore:
    """The output prefix: committed parts, temporary files and the manifest."""

    def __init__(self, config: JobConfig):
        self.fs, self.root = resolve(config.output.path, config.source.storage)
        self.uri = config.output.path

    def _path(self, *names: str) -> str:
        return posixpath.join(self.root, *names)

    def committed(self) -> dict[str, pq.FileMetaData]:
        """Final part files by name, with their Parquet metadata."""
        selector = pafs.FileSelector(self.root, recursive=False, allow_not_found=True)
        parts = {}
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File and PART_RE.match(info.base_name):
                with self.fs.open_input_file(info.path) as handle:
                    parts[info.base_name] = pq.read_metadata(handle)
        return parts

    def read_part(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """A committed part (some columns of it: resume reads only the counts)."""
        with self.fs.open_input_file(self._path(name)) as handle:
            return pq.read_table(handle, columns=columns)

    def clear(self) -> None:
        """Remove everything a previous run wrote (output.overwrite)."""
        for name in self.committed():
            self.fs.delete_file(self._path(name))
        self.clear_tmp()
        if self.fs.get_file_info(self._path(MANIFEST)).type == pafs.FileType.File:
            self.fs.delete_file(self._path(MANIFEST))

    def clear_tmp(self) -> None:
        if self.fs.get_file_info(self._path(TMP_DIR)).type == pafs.FileType.Directory:
            self.fs.delete_dir(self._path(TMP_DIR))

    def _publish(self, name: str, write: Callable[[Any], None]) -> None:
        """Write to a unique temporary name, then move it to `name` in one step."""
        tmp = self._path(TMP_DIR, f"{name}.{uuid.uuid4().hex}")
        if isinstance(self.fs, pafs.LocalFileSystem):  # object stores need no directories
            self.fs.create_dir(self._path(TMP_DIR), recursive=True)
        with self.fs.open_output_stream(tmp) as handle:
            write(handle)
        self.fs.move(tmp, self._path(name))

    def write_part(self, name: str, table: pa.Table) -> None:
        self._publish(name, lambda handle: pq.write_table(table, handle, compression="zstd"))

    def read_manifest(self) -> dict[str, Any] | None:
        path = self._path(MANIFEST)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as handle:
            return json.loads(handle.read())

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        self._publish(MANIFEST, lambda handle: handle.write(data))


def _kept_column(values: list[Any]) -> pa.Array:
    """Arrow infers the type of a kept column; mixed values fall back to JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else json.dumps(v, default=str) for v in values],
                        pa.string())


def assemble(rows: pa.Table, config: JobConfig, config_hash: str, source_uri: str) -> pa.Table:
    """A shard's work rows -> the output schema, sorted by row, with the kept input columns."""
    rows = rows.sort_by("row_index")
    n = rows.num_rows
    constants = {
        "model": config.model.path or DEMO_NAME,
        "engine": config.model.engine,
        "multi_mask": config.prompt.multi_mask,
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
    schema = output_schema(pa.schema(kept_fields)).with_metadata({
        META_SCHEMA_VERSION: SCHEMA_VERSION.encode(),
        META_CONFIG_HASH: config_hash.encode(),
        META_SOURCE_FILE: source_uri.encode(),
    })
    return pa.Table.from_arrays(columns, schema=schema)


class ShardWriter:
    """Collects streamed rows per shard and commits each shard once it is complete."""

    def __init__(self, store: OutputStore, config: JobConfig, config_hash: str,
                 on_commit: Callable[[str, dict[str, Any]], None]):
        self.store = store
        self.config = config
        self.config_hash = config_hash
        self.on_commit = on_commit
        self.pending: dict[str, list[pa.Table]] = {}
        self.expected: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.done: set[str] = set()

    def add(self, batch: pa.Table) -> None:
        sources = batch.column("source_file")
        for source in pc.unique(sources).to_pylist():
            part = batch.filter(pc.equal(sources, source))
            if source in self.done:
                raise RuntimeError(f"shard {source}: more rows after it was committed")
            self.pending.setdefault(source, []).append(part)
            self.expected[source] = part.column("shard_rows")[0].as_py()
            self.received[source] = self.received.get(source, 0) + part.num_rows
            if self.received[source] == self.expected[source]:
                self.commit(source)

    def commit(self, source: str) -> None:
        rows = pa.concat_tables(self.pending.pop(source, []) or [WORK_SCHEMA.empty_table()])
        table = assemble(rows, self.config, self.config_hash, source)
        name = part_name(source)
        self.store.write_part(name, table)
        self.done.add(source)
        self.on_commit(source, {"file": name, "status": "committed",
                                "committed_at": time.time(), **shard_stats(table)})

    def finish(self, shards: list[str]) -> None:
        """Commit shards that had no rows at all (empty files); anything else is a bug."""
        for source in shards:
            if source in self.done:
                continue
            if source in self.received:
                raise RuntimeError(f"shard {source}: received {self.received[source]} of "
                                   f"{self.expected[source]} rows; not committing it")
            self.commit(source)

