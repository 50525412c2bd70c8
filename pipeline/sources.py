"""Input shards: finding the files of a job and reading each one into validated rows.

One input shard = one file (Parquet, or JSONL optionally .gz/.zst), local or on s3://, gs://,
az://. Filesystems are pyarrow's, with credentials from the standard environment and config
files of each cloud; `storage.endpoint_url` points S3 at a compatible store.

Reading never raises for bad data: a malformed JSON line, bytes that are not UTF-8, a text of
the wrong type, a null or empty text, even a file that cannot be read all become rows with
`error_type` and `error_message`, so every input row reaches the output exactly once.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import json
import os
import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import SourceConfig, StorageConfig

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = tuple(base + comp for base in (".jsonl", ".ndjson", ".json")
                       for comp in ("", ".gz", ".zst"))
REMOTE_SCHEMES = ("s3", "gs", "az")
GLOB_CHARS = "*?["
READ_CHUNK = 1 << 16  # small enough that a truncated archive keeps most rows


class SourceError(ValueError):
    """The job's source cannot be listed (a missing path, an unknown scheme, no files)."""


def _scheme(uri: str) -> str:
    scheme, sep, _ = uri.partition("://")
    return scheme if sep else "file"


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


@functools.lru_cache(maxsize=16)
def _remote_filesystem(scheme: str, storage: StorageConfig) -> pafs.FileSystem:
    if scheme == "s3":
        endpoint = storage.endpoint_url or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        return pafs.S3FileSystem(endpoint_override=endpoint, region=storage.region,
                                 anonymous=storage.anonymous)
    if scheme == "gs":
        return pafs.GcsFileSystem(anonymous=storage.anonymous,
                                  endpoint_override=storage.endpoint_url)
    if scheme == "az":  # names of adlfs and of the Azure CLI; no key: DefaultAzureCredential
        account = _env("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT")
        if not account:
            raise SourceError("az:// paths need AZURE_STORAGE_ACCOUNT_NAME in the environment")
        endpoint_scheme, _, authority = (storage.endpoint_url or "").rpartition("://")
        return pafs.AzureFileSystem(
            account, account_key=_env("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_KEY"),
            blob_storage_authority=authority or None,
            blob_storage_scheme=endpoint_scheme or None)
    raise SourceError(f"unsupported scheme {scheme!r}; use a local path, s3://, gs:// or az://")


def resolve(uri: str, storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """The filesystem serving `uri` and the path inside it."""
    scheme = _scheme(uri)
    if scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    return _remote_filesystem(scheme, storage), uri.split("://", 1)[1]


def _to_uri(scheme: str, path: str) -> str:
    return path if scheme == "file" else f"{scheme}://{path}"


def _wanted(path: str, fmt: str) -> bool:
    """Files a directory or glob contributes: data files of the format, not hidden ones."""
    name = posixpath.basename(path)
    if name.startswith((".", "_")):
        return False
    suffixes = {"parquet": PARQUET_SUFFIXES, "jsonl": JSONL_SUFFIXES}.get(
        fmt, PARQUET_SUFFIXES + JSONL_SUFFIXES)
    return name.lower().endswith(suffixes)


def _expand(uri: str, source: SourceConfig) -> list[str]:
    scheme = _scheme(uri)
    fs, path = resolve(uri, source.storage)
    if any(c in path for c in GLOB_CHARS):
        if scheme == "file":
            matches = glob.glob(path, recursive=True)
        else:
            base = path[:min(path.find(c) for c in GLOB_CHARS if c in path)].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            matches = [i.path for i in infos if fnmatch.fnmatchcase(i.path, path)]
        files = [m for m in matches if fs.get_file_info(m).type == pafs.FileType.File]
        return [_to_uri(scheme, f) for f in files if _wanted(f, source.format)]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [_to_uri(scheme, path)]
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return [_to_uri(scheme, i.path) for i in infos
                if i.type == pafs.FileType.File and _wanted(i.path, source.format)]
    raise SourceError(f"source.paths: {uri} does not exist")


def list_shards(source: SourceConfig) -> list[str]:
    """Every input file of the job, sorted and without duplicates: one shard each."""
    shards = sorted({f for uri in source.paths for f in _expand(uri, source)})
    if not shards:
        raise SourceError(f"source.paths matched no input files: {source.paths}")
    return shards


def shard_format(uri: str, fmt: str) -> str:
    """`source.format`, or with `auto` the format the file name says (JSONL otherwise)."""
    if fmt != "auto":
        return fmt
    return "parquet" if uri.lower().endswith(PARQUET_SUFFIXES) else "jsonl"


class _Rows:
    """Turns the records of one shard into validated rows with stable ids."""

    def __init__(self, uri: str, source: SourceConfig):
        self.uri = uri
        self.basename = posixpath.basename(uri)
        self.source = source

    def error(self, index: int, error_type: str | None, message: str | None,
              record: dict[str, Any] | None = None) -> dict[str, Any]:
        return dict(id=f"{self.basename}:{index}", source_file=self.uri, row_index=index,
                    text=None, record=record or {}, error_type=error_type,
                    error_message=message)

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
                return {**row, "error_type": "missing_id",
                        "error_message": f"id column {source.id_column!r} is missing or empty"}
            if isinstance(value, dict | list):
                return {**row, "error_type": "wrong_type",
                        "error_message": f"id column {source.id_column!r} holds a "
                                         f"{type(value).__name__}, expected a string or number"}
            row["id"] = str(value)
        text = record.get(source.text_column)
        if isinstance(text, bytes):
            try:
                text = record[source.text_column] = text.decode("utf-8")
            except UnicodeDecodeError as err:
                return {**row, "error_type": "invalid_utf8",
                        "error_message": f"text column {source.text_column!r}: {err}"}
        if text is None:
            return {**row, "error_type": "missing_text",
                    "error_message": f"text column {source.text_column!r} is missing or null"}
        if not isinstance(text, str):
            return {**row, "error_type": "wrong_type",
                    "error_message": f"text column {source.text_column!r} holds a "
                                     f"{type(text).__name__}, expected a string"}
        if not text.strip():
            return {**row, "error_type": "empty_text",
                    "error_message": f"text column {source.text_column!r} is empty"}
        return {**row, "text": text}


def _lines(fs: pafs.FileSystem, path: str) -> Iterator[bytes | Exception]:
    """The (decompressed) lines of a file, streamed; a read failure ends them as an item."""
    rest = b""
    try:
        with fs.open_input_stream(path, compression="detect") as stream:
            while chunk := stream.read(READ_CHUNK):
                *lines, rest = (rest + chunk).split(b"\n")
                yield from lines
    except Exception as err:  # truncated archive, vanished object: the partial line is lost
        yield err
        return
    if rest:
        yield rest


def _jsonl_rows(rows: _Rows, fs: pafs.FileSystem, path: str) -> Iterator[dict[str, Any]]:
    for index, raw in enumerate(_lines(fs, path)):
        if isinstance(raw, Exception):
            yield rows.error(index, "read_error", f"reading stopped after {index} lines: {raw}")
            return
        if not raw.strip():
            continue  # blank lines are not rows
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield rows.error(index, "invalid_utf8", f"line {index + 1}: {err}")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            yield rows.error(index, "invalid_json", f"line {index + 1}: {err}")
            continue
        if not isinstance(record, dict):
            yield rows.error(index, "invalid_json",
                             f"line {index + 1}: expected a JSON object, got "
                             f"{type(record).__name__}")
            continue
        yield rows.row(index, record)


def _parquet_rows(rows: _Rows, fs: pafs.FileSystem, path: str) -> Iterator[dict[str, Any]]:
    index = 0
    try:
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            wanted = None
            if rows.source.columns is not None:
                extra = [rows.source.text_column, rows.source.id_column]
                wanted = [c for c in names if c in {*rows.source.columns, *extra}]
            for batch in parquet.iter_batches(columns=wanted):
                for record in batch.to_pylist():
                    yield rows.row(index, record)
                    index += 1
    except Exception as err:  # a corrupt or unreadable file: one error row records it
        yield rows.error(index, "read_error", f"cannot read Parquet after {index} rows: {err}")


def read_shard(uri: str, source: SourceConfig) -> list[dict[str, Any]]:
    """All rows of one input file, each either valid (text set) or an error row."""
    rows = _Rows(uri, source)
    try:
        fs, path = resolve(uri, source.storage)
    except Exception as err:
        return [rows.error(0, "read_error", f"cannot open {uri}: {err}")]
    reader = _parquet_rows if shard_format(uri, source.format) == "parquet" else _jsonl_rows
    return list(reader(rows, fs, path))
