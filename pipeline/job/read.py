"""Read: one Ray read task per work unit (pipeline/job/plan.py), streaming bounded blocks.

A unit is read into one block of work rows (a compressed stream gives one block per unit of
`source.unit_rows` lines), so no component ever holds a whole file. Row data never raises: a
line that is not JSON or not UTF-8, text Arrow cannot hold (lone surrogates), a line over
`source.max_line_bytes`, a wrong type, a missing or empty text all become rows with
`error_type` and `error_message`. Storage faults are retried (`retry:`) and otherwise fail the
read task, so the unit is not committed and the next run reads it again. A compressed file that
turns out truncated or corrupt keeps every complete line before the damage; the damage is
recorded on its last unit.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.glm.requests import InfillError
from pipeline.job.config import JobConfig, SourceConfig
from pipeline.job.plan import Unit
from pipeline.job.retry import retry_stream, with_retries
from pipeline.job.rows import WORK_SCHEMA, parse_json_record, require_text, to_block
from pipeline.job.storage import SourceFormat, resolve
from pipeline.job.write import write_empty_unit
from schemas.errors import ErrorType

READ_CHUNK = 1 << 16
BOM = b"\xef\xbb\xbf"


class RowMaker:
    """Turns the records of one unit into validated work rows with stable ids."""

    def __init__(self, unit: Unit, source: SourceConfig):
        self.unit = unit
        self.source = source

    def error(self, index: int, error_type: ErrorType | None, message: str | None,
              record: dict[str, Any] | None = None) -> dict[str, Any]:
        return dict(id=f"{self.unit.key}:{index}", source_file=self.unit.uri, row_index=index,
                    record=record or {}, error_type=error_type, error_message=message)

    def row(self, index: int, record: dict[str, Any]) -> dict[str, Any]:
        source = self.source
        if source.columns is not None:
            keep = {*source.columns, source.text_column}
            if source.id_column:
                keep.add(source.id_column)
            record = {k: v for k, v in record.items() if k in keep}
        row = self.error(index, None, None, record)
        if source.id_column:
            value = record.get(source.id_column)
            if value is None or value == "":
                return {**row, "error_type": ErrorType.MISSING_ID,
                        "error_message": f"id column {source.id_column!r} is missing or empty"}
            if isinstance(value, dict | list):
                return {**row, "error_type": ErrorType.WRONG_TYPE,
                        "error_message": f"id column {source.id_column!r} holds a "
                                         f"{type(value).__name__}, expected a string or number"}
            row["id"] = str(value)
        text = record.get(source.text_column)
        if isinstance(text, bytes):
            try:
                record[source.text_column] = text.decode("utf-8")
            except UnicodeDecodeError as err:
                return {**row, "error_type": ErrorType.INVALID_UTF8,
                        "error_message": f"text column {source.text_column!r}: {err}"}
        try:
            require_text(record, source.text_column)
        except InfillError as err:
            return {**row, "error_type": err.error_type, "error_message": str(err)}
        return row

    def finish(self, row: dict[str, Any]) -> dict[str, Any]:
        """The record as JSON text; text Arrow cannot hold (lone surrogates) is a row error."""
        try:
            text = json.dumps(row["record"], ensure_ascii=False, default=str)
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            return {**row, "id": f"{self.unit.key}:{row['row_index']}", "record": "{}",
                    "error_type": ErrorType.INVALID_TEXT,
                    "error_message": f"the row holds text that is not valid Unicode ({err.reason} "
                                     f"at character {err.start})"}
        return {**row, "record": text}


def split_lines(chunks: Iterable[bytes], max_line: int) -> Iterator[tuple[int, bytes | None]]:
    """(length, line) for each line of a byte stream, without its newline; the line is None
    when it is longer than `max_line` (its bytes are skipped, never held)."""
    rest, size, overlong = bytearray(), 0, False
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            size += end - start
            yield size, None if overlong or size > max_line else bytes(rest) + chunk[start:end]
            rest, size, overlong, start = bytearray(), 0, False, end + 1
        size += len(chunk) - start
        if not overlong:
            rest += chunk[start:]
            if size > max_line:
                rest, overlong = bytearray(), True
    if size:
        yield size, None if overlong else bytes(rest)


def read_chunks(handle: Any) -> Iterator[bytes]:
    while chunk := handle.read(READ_CHUNK):
        yield chunk


def _range_lines(fs: pafs.FileSystem, path: str, unit: Unit, max_line: int
                 ) -> Iterator[bytes | None]:
    """The lines that start inside the unit's byte range."""
    with fs.open_input_file(path) as handle:
        position = unit.start
        if position > 0:  # skip the end of the line that started in the previous range
            handle.seek(position - 1)
            length, _ = next(split_lines(read_chunks(handle), max_line=0), (0, None))
            position += length
            handle.seek(position)
        for length, line in split_lines(read_chunks(handle), max_line):
            if position >= unit.stop:
                return
            yield line
            position += length + 1


class FileChangedError(OSError):
    """An input file is not what the plan saw (a fault: retried, then the job fails and the
    next run plans again)."""


class Damaged(Exception):
    """The compressed bytes of a file are bad from here on (not a storage fault)."""


def _decompressor(path: str) -> Any:
    """A streaming decompressor for the file's suffix (.gz or .zst)."""
    if path.lower().endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj()
    return zlib.decompressobj(wbits=31)


def _decompressed(raw: Iterable[bytes], path: str) -> Iterator[bytes]:
    """The decompressed bytes of a .gz/.zst stream, as far as they can be decoded. Python's
    own decompressors, not Arrow's: Arrow drops the output of its last buffer when the input
    is cut, and the lines in it are complete data. Damage raises `Damaged` after the bytes
    before it."""
    import zstandard

    decompressor = _decompressor(path)
    for chunk in raw:
        while chunk:
            if decompressor.eof:  # several members or frames (concatenated files)
                decompressor = _decompressor(path)
            try:
                out = decompressor.decompress(chunk)
            except (zlib.error, zstandard.ZstdError) as err:
                raise Damaged(f"corrupt compressed stream: {err}") from None
            if out:
                yield out
            chunk = decompressor.unused_data if decompressor.eof else b""
    if not decompressor.eof:
        raise Damaged("truncated compressed stream: the file ends inside compressed data")


def stream_lines(fs: pafs.FileSystem, path: str, max_line: int) -> Iterator[bytes | None]:
    """Every line of a compressed file, in order. Damage raises `Damaged`; the lines before
    it are complete (a line is yielded only once its newline arrived)."""
    with fs.open_input_stream(path, compression=None) as stream:  # raw bytes
        for _, line in split_lines(_decompressed(read_chunks(stream), path), max_line):
            yield line


def json_row(rows: RowMaker, index: int, raw: bytes | None, max_line: int) -> dict[str, Any] | None:
    """One JSONL line as a work row; None for a blank line (not a row)."""
    if raw is None:
        return rows.error(index, ErrorType.LINE_TOO_LONG,
                          f"line {index + 1} is longer than source.max_line_bytes ({max_line})")
    if index == 0 and raw.startswith(BOM):
        raw = raw[len(BOM):]
    if not raw.strip():
        return None
    try:
        record = parse_json_record(raw)
    except InfillError as err:
        return rows.error(index, err.error_type, f"line {index + 1}: {err}")
    return rows.row(index, record)


def _parquet_rows(rows: RowMaker, fs: pafs.FileSystem, path: str) -> Iterator[dict[str, Any]]:
    unit, source = rows.unit, rows.source
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        wanted = None
        if source.columns is not None:
            names = {*source.columns, source.text_column, source.id_column}
            wanted = [c for c in parquet.schema_arrow.names if c in names]
        index = unit.first_row
        for batch in parquet.iter_batches(columns=wanted,
                                          row_groups=list(range(unit.start, unit.stop or 0))):
            for record in batch.to_pylist():
                yield rows.row(index, record)
                index += 1


class UnitReader:
    """The read task of one unit: a generator of blocks, one per unit."""

    def __init__(self, unit: Unit, job: dict[str, Any], config_hash: str,
                 commit_empty: bool = True):
        self.unit = unit
        self.config_hash = config_hash
        self.commit_empty = commit_empty  # False: a lazy dataset that commits nothing
        self.config = JobConfig.model_validate(job)
        self.source = self.config.source
        self.rows = RowMaker(unit, self.source)

    def _lines_to_rows(self, lines: Iterable[bytes | None], first: int) -> list[dict]:
        found = []
        for index, raw in enumerate(lines, start=first):
            row = json_row(self.rows, index, raw, self.source.max_line_bytes)
            if row is not None:
                found.append(self.rows.finish(row))
        return found

    def _check_unchanged(self, fs: pafs.FileSystem, path: str) -> None:
        """A file that changed since planning would shift rows between units: a fault."""
        size = fs.get_file_info(path).size
        if self.unit.size is not None and size != self.unit.size:
            raise FileChangedError(f"{self.unit.uri} changed since the job was planned "
                                   f"({self.unit.size} -> {size} bytes)")

    def _read_unit(self) -> list[dict[str, Any]]:
        fs, path = resolve(self.unit.uri, self.source.storage)
        self._check_unchanged(fs, path)
        if self.unit.fmt is SourceFormat.PARQUET:
            return [self.rows.finish(r) for r in _parquet_rows(self.rows, fs, path)]
        lines = _range_lines(fs, path, self.unit, self.source.max_line_bytes)
        return self._lines_to_rows(lines, self.unit.first_row)

    def __call__(self) -> Iterator[pa.Table]:
        what = f"reading {self.unit.uri}"
        if self.unit.index is not None:
            rows = with_retries(self._read_unit, f"{what} (unit {self.unit.index})",
                                self.config.retry)
            yield from self._emit(rows, self.unit.index, True, None)
            return
        emitted: set[int] = set()
        yield from retry_stream(lambda: self._stream(emitted), what, self.config.retry)

    def _stream(self, emitted: set[int]) -> Iterator[pa.Table]:
        """Units of `unit_rows` lines of a compressed file; the last one says it is last.
        Units in `emitted` (by an earlier attempt) or committed by an earlier run are skipped."""
        fs, path = resolve(self.unit.uri, self.source.storage)
        self._check_unchanged(fs, path)
        size = self.source.unit_rows
        lines = stream_lines(fs, path, self.source.max_line_bytes)
        chunk: list[bytes | None] = []
        index = 0
        damage = None
        try:
            for line in lines:
                if len(chunk) == size:
                    yield from self._emit_lines(chunk, index, False, None, emitted)
                    chunk, index = [], index + 1
                chunk.append(line)
        except Damaged as err:
            damage = str(err)
        yield from self._emit_lines(chunk, index, True, damage, emitted)

    def _emit_lines(self, lines: list[bytes | None], index: int, last: bool,
                    damage: str | None, emitted: set[int]) -> Iterator[pa.Table]:
        if index in emitted or index in self.unit.committed:
            return
        emitted.add(index)
        rows = self._lines_to_rows(lines, index * self.source.unit_rows)
        yield from self._emit(rows, index, last, damage)

    def _emit(self, rows: list[dict[str, Any]], index: int, last: bool,
              damage: str | None) -> Iterator[pa.Table]:
        """The unit's block; a unit without rows is committed here, as an empty block might
        never reach the write stage."""
        block = to_block([{**row, "unit": index, "unit_rows": len(rows), "unit_last": last,
                           "unit_damage": damage} for row in rows])
        if rows:
            yield block
        elif self.commit_empty:
            write_empty_unit(self.config, self.config_hash, self.unit.uri, index, last, damage)


class UnitDatasource(Datasource):
    """Ray Data source with one read task per unit (`override_num_blocks=len(units)` keeps
    Ray from re-splitting a unit's output)."""

    def __init__(self, units: list[Unit], job: dict[str, Any], config_hash: str,
                 commit_empty: bool = True):
        self.units = units
        self.job = job
        self.config_hash = config_hash
        self.commit_empty = commit_empty

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(functools.partial(_read, unit, self.job, self.config_hash,
                                           self.commit_empty),
                         BlockMetadata(num_rows=unit.rows, size_bytes=None, exec_stats=None,
                                       input_files=(unit.uri,)),
                         schema=WORK_SCHEMA)
                for unit in self.units]


def _read(unit: Unit, job: dict[str, Any], config_hash: str, commit_empty: bool
          ) -> Iterator[pa.Table]:
    return UnitReader(unit, job, config_hash, commit_empty)()
