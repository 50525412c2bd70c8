"""Plan: list the input files and cut each one into work units, the job's unit of commit.

* Parquet: consecutive row groups, grouped up to `source.unit_rows` rows (a row group is the
  smallest unit; its row count comes from the footer, so rows are known up front).
* Uncompressed JSONL: byte ranges of about `source.unit_bytes`; a line belongs to the range in
  which it starts. So that `row_index` stays the line number in the file, the planner counts the
  newlines of every range but the last in parallel Ray tasks (one extra pass over the bytes).
* Compressed JSONL (.gz, .zst): cannot be cut without decompressing, so one read task reads the
  file in order and emits a unit every `source.unit_rows` lines (`Unit.index` None). The last
  unit records that it is the last, so a resumed run knows whether the file is complete.

A unit's part file has a deterministic name (`part_name`): resume skips the units whose part
exists. A Parquet file whose footer cannot be parsed is unreadable data, not a fault: it is
listed in the manifest and fails the job unless `source.skip_unreadable_files`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import os
import posixpath
import re

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.job.config import SourceConfig
from pipeline.job.retry import with_retries
from pipeline.job.storage import (
    SourceFormat,
    StorageConfig,
    file_format,
    is_data_file,
    resolve,
    scheme,
    strip_data_suffix,
    to_uri,
)

GLOB_CHARS = "*?["
COMPRESSED_SUFFIXES = (".gz", ".zst")
LINE_SCAN_CHUNK = 1 << 20


class SourceError(ValueError):
    """The job's source cannot be listed (a missing path, an unknown scheme, no files)."""


def _expand(uri: str, source: SourceConfig) -> list[str]:
    uri_scheme = scheme(uri)
    fs, path = resolve(uri, source.storage)
    if any(c in path for c in GLOB_CHARS):
        if uri_scheme == "file":
            matches = glob.glob(path, recursive=True)
        else:
            base = path[:min(path.find(c) for c in GLOB_CHARS if c in path)].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            matches = [i.path for i in infos if fnmatch.fnmatchcase(i.path, path)]
        files = [m for m in matches if fs.get_file_info(m).type == pafs.FileType.File]
        return [to_uri(uri_scheme, f) for f in files if is_data_file(f, source.format)]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [to_uri(uri_scheme, path)]
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return [to_uri(uri_scheme, i.path) for i in infos
                if i.type == pafs.FileType.File and is_data_file(i.path, source.format)]
    raise SourceError(f"source.paths: {uri} does not exist")


def list_files(source: SourceConfig) -> list[str]:
    """Every input file of the job, sorted and without duplicates."""
    files = sorted({f for uri in source.paths for f in _expand(uri, source)})
    if not files:
        raise SourceError(f"source.paths matched no input files: {source.paths}")
    return files


def part_name(uri: str, index: int) -> str:
    """The final file name of one unit: stable across runs, unique per (source file, unit)."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", strip_data_suffix(posixpath.basename(uri)))
    return f"part-{digest}-{base}-{index:05d}.parquet"


@dataclasses.dataclass(frozen=True)
class Unit:
    """What one read task reads. For a compressed stream (`index` None) every `unit_rows`
    lines of the file become one unit; `committed` lists the ones an earlier run wrote."""

    uri: str
    key: str  # the file's path relative to the job's input root: the prefix of fallback ids
    fmt: SourceFormat
    index: int | None = 0
    start: int = 0  # Parquet: first row group; JSONL: first byte
    stop: int | None = None  # Parquet: row group after the last; JSONL: byte after the range
    first_row: int = 0  # row_index of the unit's first row (JSONL: its first line's number)
    rows: int | None = None  # known from the Parquet footer
    committed: frozenset[int] = frozenset()
    size: int | None = None  # the file's size when planned: a changed file is a fault
    data_bytes: int | None = None  # uncompressed bytes read (None: a compressed stream)

    @property
    def part(self) -> str:
        if self.index is None:
            raise ValueError("a compressed stream has one part per chunk, not one")
        return part_name(self.uri, self.index)


@dataclasses.dataclass
class Plan:
    units: list[Unit]
    unreadable: dict[str, str]  # uri -> why it cannot be parsed
    rows_known: int  # rows counted from metadata
    bytes_unknown: int  # JSONL bytes whose rows are only estimated


def file_keys(uris: list[str]) -> dict[str, str]:
    """Each file's path relative to the directory all input files share: unique per file."""
    paths = [u.split("://", 1)[-1] for u in uris]
    root = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(paths)
    return {u: posixpath.relpath(p, root) if root else p for u, p in zip(uris, paths, strict=True)}


def _parquet_units(uri: str, key: str, fs: pafs.FileSystem, path: str, unit_rows: int
                   ) -> list[Unit]:
    with fs.open_input_file(path) as handle:
        meta = pq.ParquetFile(handle).metadata
    units: list[Unit] = []
    group, first, rows, data = 0, 0, 0, 0
    for rg in range(meta.num_row_groups):
        row_group = meta.row_group(rg)
        size = row_group.num_rows
        if rows and rows + size > unit_rows:
            units.append(Unit(uri, key, SourceFormat.PARQUET, len(units), group, rg, first, rows,
                              data_bytes=data))
            group, first, rows, data = rg, first + rows, 0, 0
        rows += size
        data += row_group.total_byte_size
    if rows or not units:
        units.append(Unit(uri, key, SourceFormat.PARQUET, len(units), group,
                          meta.num_row_groups, first, rows, data_bytes=data))
    return units


def count_newlines(uri: str, storage: StorageConfig, start: int, stop: int) -> int:
    """Newlines in bytes [start, stop) of a file (a planning task; streams in 1 MiB chunks)."""
    fs, path = resolve(uri, storage)

    def count() -> int:
        found = 0
        with fs.open_input_file(path) as handle:
            handle.seek(start)
            left = stop - start
            while left > 0 and (chunk := handle.read(min(LINE_SCAN_CHUNK, left))):
                found += chunk.count(b"\n")
                left -= len(chunk)
        return found

    return with_retries(count, f"counting lines of {uri}")


def _jsonl_ranges(uri: str, key: str, size: int, unit_bytes: int) -> list[Unit]:
    bounds = list(range(0, size, unit_bytes)) or [0]
    stops = [*bounds[1:], size]
    return [Unit(uri, key, SourceFormat.JSONL, i, start, stop, data_bytes=stop - start)
            for i, (start, stop) in enumerate(zip(bounds, stops, strict=True))]


def _number_lines(units: list[Unit], storage: StorageConfig) -> list[Unit]:
    """Give every byte range the line number of its first line (parallel newline counts).

    The first line starting at or after byte s > 0 follows the first newline at or after s - 1,
    so its number is the count of newlines in [0, s - 1) plus one."""
    if len(units) == 1:
        return units
    import ray

    edges = [0] + [u.start - 1 for u in units[1:]]
    ranges = list(zip(edges[:-1], edges[1:], strict=True))
    if ray.is_initialized():  # on the cluster, in parallel
        counter = ray.remote(num_cpus=0.25)(count_newlines)
        counts = ray.get([counter.remote(units[0].uri, storage, a, b) for a, b in ranges])
    else:
        counts = [count_newlines(units[0].uri, storage, a, b) for a, b in ranges]
    numbered, seen = [units[0]], 0
    for unit, count in zip(units[1:], counts, strict=True):
        seen += count
        numbered.append(dataclasses.replace(unit, first_row=seen + 1))
    return numbered


def plan_units(uris: list[str], source: SourceConfig, committed: set[str],
               finished_streams: set[str]) -> Plan:
    """Every unit still to do: units whose part is in `committed` are left out, and so are
    the compressed files in `finished_streams` (all their units committed)."""
    keys = file_keys(uris)
    units: list[Unit] = []
    unreadable: dict[str, str] = {}
    rows_known = bytes_unknown = 0
    for uri in uris:
        fs, path = resolve(uri, source.storage)
        size = with_retries(lambda fs=fs, path=path: fs.get_file_info(path).size,
                            f"sizing {uri}")
        if file_format(uri, source.format) is SourceFormat.PARQUET:
            try:
                file_units = with_retries(
                    lambda fs=fs, path=path, uri=uri: _parquet_units(
                        uri, keys[uri], fs, path, source.unit_rows), f"reading the footer of {uri}")
            except ValueError as err:  # ArrowInvalid: not a Parquet file, a corrupt footer
                unreadable[uri] = f"{type(err).__name__}: {err}"
                continue
            rows_known += sum(u.rows or 0 for u in file_units)
        elif uri.lower().endswith(COMPRESSED_SUFFIXES):
            if uri in finished_streams:
                continue
            bytes_unknown += 4 * size  # JSONL usually compresses about 4:1
            done = {i for i in range(len(committed)) if part_name(uri, i) in committed}
            file_units = [Unit(uri, keys[uri], SourceFormat.JSONL, None, committed=frozenset(done))]
        else:
            bytes_unknown += size
            file_units = _jsonl_ranges(uri, keys[uri], size, source.unit_bytes)
            if any(u.part not in committed for u in file_units):
                file_units = _number_lines(file_units, source.storage)
        units += [dataclasses.replace(u, size=size) for u in file_units
                  if u.index is None or u.part not in committed]
    return Plan(units, unreadable, rows_known, bytes_unknown)


def is_inside(path: str, folder: str) -> bool:
    """Whether `path` lies inside (or is) `folder`, both URIs or local paths."""
    def norm(uri: str) -> str:
        return uri.rstrip("/") if "://" in uri else os.path.abspath(uri)

    path, folder = norm(path), norm(folder)
    return path == folder or path.startswith(folder.rstrip("/") + "/")
