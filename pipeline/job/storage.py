"""Where a job's files live: filesystems for local paths and object storage, the one rule for
which file names are data files, and the output prefix (committed parts, `_tmp/`, manifest).

Filesystems are pyarrow's, with credentials from the standard environment and config files of
each cloud; `source.storage.endpoint_url` points S3 at a compatible store (SeaweedFS, MinIO).
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import uuid
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

MANIFEST = "_manifest.json"
REPORT = "_report.html"  # `_`: readers of the parts skip it, as they skip the manifest
TMP_DIR = "_tmp"
PART_RE = re.compile(r"^part-[0-9a-f]{16}-.*\.parquet$")


class StorageError(ValueError):
    """A location that cannot be used (unknown scheme, missing credentials settings)."""


class OutputError(RuntimeError):
    """The output location holds results this job must not mix with its own."""


class StorageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # hashable: filesystems are cached

    endpoint_url: str | None = None  # S3-compatible stores (SeaweedFS, MinIO, ...)
    region: str | None = None
    anonymous: bool = False


class SourceFormat(StrEnum):
    AUTO = "auto"
    PARQUET = "parquet"
    JSONL = "jsonl"


SUFFIXES = {
    SourceFormat.PARQUET: (".parquet", ".pq"),
    SourceFormat.JSONL: tuple(base + compression for base in (".jsonl", ".ndjson", ".json")
                              for compression in ("", ".gz", ".zst")),
}


def is_data_file(path: str, fmt: SourceFormat) -> bool:
    """Files a directory or glob contributes: data files of the format, not hidden ones."""
    name = posixpath.basename(path)
    if name.startswith((".", "_")):
        return False
    wanted = SUFFIXES.get(fmt) or SUFFIXES[SourceFormat.PARQUET] + SUFFIXES[SourceFormat.JSONL]
    return name.lower().endswith(wanted)


def file_format(uri: str, fmt: SourceFormat) -> SourceFormat:
    """`source.format`, or with `auto` the format the file name says (JSONL otherwise)."""
    if fmt is not SourceFormat.AUTO:
        return fmt
    parquet = uri.lower().endswith(SUFFIXES[SourceFormat.PARQUET])
    return SourceFormat.PARQUET if parquet else SourceFormat.JSONL


def strip_data_suffix(name: str) -> str:
    """`part-000.jsonl.gz` -> `part-000`."""
    for suffix in sorted((s for group in SUFFIXES.values() for s in group), key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


def scheme(uri: str) -> str:
    prefix, sep, _ = uri.partition("://")
    return prefix if sep else "file"


def to_uri(uri_scheme: str, path: str) -> str:
    return path if uri_scheme == "file" else f"{uri_scheme}://{path}"


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


@functools.lru_cache(maxsize=16)
def _remote_filesystem(uri_scheme: str, storage: StorageConfig) -> pafs.FileSystem:
    if uri_scheme == "s3":
        endpoint = storage.endpoint_url or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        # the SDK's own retries (throttling, 5xx) under ours (pipeline/job/retry.py)
        return pafs.S3FileSystem(endpoint_override=endpoint, region=storage.region,
                                 anonymous=storage.anonymous,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))
    if uri_scheme == "gs":
        return pafs.GcsFileSystem(anonymous=storage.anonymous,
                                  endpoint_override=storage.endpoint_url)
    if uri_scheme == "az":  # names of adlfs and of the Azure CLI; no key: DefaultAzureCredential
        account = _env("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT")
        if not account:
            raise StorageError("az:// paths need AZURE_STORAGE_ACCOUNT_NAME in the environment")
        endpoint_scheme, _, authority = (storage.endpoint_url or "").rpartition("://")
        return pafs.AzureFileSystem(
            account, account_key=_env("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_KEY"),
            blob_storage_authority=authority or None,
            blob_storage_scheme=endpoint_scheme or None)
    raise StorageError(f"unsupported scheme {uri_scheme!r}; use a local path, s3://, gs:// or "
                       "az://")


def resolve(uri: str, storage: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """The filesystem serving `uri` and the path inside it."""
    uri_scheme = scheme(uri)
    if uri_scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    return _remote_filesystem(uri_scheme, storage), uri.split("://", 1)[1]


class OutputStore:
    """The output prefix: committed parts, temporary files and the manifest."""

    def __init__(self, uri: str, storage: StorageConfig):
        self.fs, self.root = resolve(uri, storage)
        self.uri = self.root if scheme(uri) == "file" else uri  # absolute, as users see it

    def _path(self, *names: str) -> str:
        return posixpath.join(self.root, *names)

    def part_names(self) -> set[str]:
        """Names of the final part files: one listing, no file opened."""
        selector = pafs.FileSelector(self.root, recursive=False, allow_not_found=True)
        return {info.base_name for info in self.fs.get_file_info(selector)
                if info.type == pafs.FileType.File and PART_RE.match(info.base_name)}

    def part_metadata(self, name: str) -> pq.FileMetaData:
        """A part's Parquet footer (its config hash, source file, unit)."""
        with self.fs.open_input_file(self._path(name)) as handle:
            return pq.read_metadata(handle)

    def committed(self) -> dict[str, pq.FileMetaData]:
        """Final part files by name, with their Parquet metadata."""
        return {name: self.part_metadata(name) for name in sorted(self.part_names())}

    def read_part(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """A committed part (some columns of it: resume reads only the counts)."""
        with self.fs.open_input_file(self._path(name)) as handle:
            return pq.read_table(handle, columns=columns)

    def iter_part(self, name: str, columns: list[str], batch_rows: int
                  ) -> Iterator[pa.RecordBatch]:
        """A committed part in batches of some columns (nested paths such as
        `fills.list.element.mask` read one field of a struct): memory bounded by the batch."""
        with self.fs.open_input_file(self._path(name)) as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_rows,
                                                           columns=columns)

    def clear(self) -> None:
        """Remove everything a previous run wrote (output.overwrite)."""
        for name in self.part_names():
            self.fs.delete_file(self._path(name))
        self.clear_tmp()
        for name in (MANIFEST, REPORT):
            if self.fs.get_file_info(self._path(name)).type == pafs.FileType.File:
                self.fs.delete_file(self._path(name))

    def clear_tmp(self) -> None:
        if self.fs.get_file_info(self._path(TMP_DIR)).type == pafs.FileType.Directory:
            self.fs.delete_dir(self._path(TMP_DIR))

    def _publish(self, name: str, write: Callable[[Any], None], tmp_dir: str = TMP_DIR) -> None:
        """Write to a unique temporary name under `tmp_dir`, then move it to `name` in one
        step."""
        tmp = self._path(tmp_dir, f"{name}.{uuid.uuid4().hex}")
        if tmp_dir and isinstance(self.fs, pafs.LocalFileSystem):  # object stores: no dirs
            self.fs.create_dir(self._path(tmp_dir), recursive=True)
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

    def write_report(self, page: str) -> None:
        """The run report (pipeline/report). Its temporary name sits beside it (an `_` name
        readers skip), not in `_tmp/`: `glm-infill report` may run beside a live job, and the
        end of a run must not leave a `_tmp/` behind it."""
        data = page.encode()
        self._publish(REPORT, lambda handle: handle.write(data), tmp_dir="")
