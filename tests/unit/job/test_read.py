"""Reading local input files: listing, and every row of a file becoming one validated work row
(JSONL plain and compressed, Parquet, bad rows), without Ray.

Cutting files into units and reading units one after the other (byte ranges, row groups,
compressed streams, truncated archives, poisonous lines) is in test_units.py; S3 is covered end
to end in tests/e2e/test_storage_s3.py.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.job.config import JobConfig, SourceConfig
from pipeline.job.plan import SourceError, list_files, plan_units
from pipeline.job.read import UnitReader
from pipeline.job.rows import WORK_SCHEMA
from pipeline.job.storage import StorageError
from schemas.errors import ErrorType

pytestmark = pytest.mark.timeout(60)

GOOD = [{"id": f"r{i}", "text": f"Row {i} is [MASK].", "lang": "en"} for i in range(3)]
# (line bytes, expected error_type or None), in file order; blank lines are not rows.
BAD_CORPUS = [
    (json.dumps(GOOD[0]).encode(), None),
    (b"{not json", "invalid_json"),
    (b'{"id": "u", "text": "caf\xe9 [MASK]"}', "invalid_utf8"),
    (b"[1, 2]", "invalid_json"),
    (b'{"id": "n", "text": null}', "missing_text"),
    (b'{"id": "m"}', "missing_text"),
    (b'{"id": "e", "text": "   "}', "empty_text"),
    (b'{"id": "w", "text": 42}', "wrong_type"),
    (b'{"id": "l", "text": ["a"]}', "wrong_type"),
    (b"", None),  # blank line: skipped, not a row
    (b'{"text": "no id [MASK]"}', None),
    (json.dumps(GOOD[1]).encode(), None),
]


def jsonl_bytes(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def source(paths: list[str] | str, **options: Any) -> SourceConfig:
    return SourceConfig.model_validate({"paths": paths, **options})


def read_file(path: Path, **options: Any) -> list[dict[str, Any]]:
    """Every work row of one file, as the read tasks of a job make them (one unit here: a
    JSONL file under `source.unit_bytes` needs no line count, so no Ray)."""
    config = JobConfig.model_validate({"source": {"paths": [str(path)], **options},
                                       "output": {"path": str(path.parent / "out")}})
    plan = plan_units([str(path)], config.source, set(), set())
    assert len(plan.units) == 1 and not plan.unreadable
    blocks = list(UnitReader(plan.units[0], config.model_dump(mode="json"), "h" * 64)())
    assert all(block.schema == WORK_SCHEMA for block in blocks)
    return [{**row, "record": json.loads(row["record"])}
            for block in blocks for row in block.to_pylist()]


def test_bad_rows_become_error_rows(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_CORPUS) + b"\n")
    rows = read_file(path, id_column="id")
    expected = [(i, kind) for i, (line, kind) in enumerate(BAD_CORPUS) if line]
    assert [(r["row_index"], r["error_type"]) for r in rows] == [
        (i, "missing_id" if i == 10 else kind) for i, kind in expected]
    assert rows[0]["id"] == "r0" and rows[0]["record"] == GOOD[0]
    assert "text" not in rows[0]  # the text stays in the record
    assert rows[1]["id"] == "bad.jsonl:1"  # unparsable: the id comes from file and line
    assert rows[1]["record"] == {}
    assert all(r["error_message"] for r in rows if r["error_type"])
    assert all(isinstance(r["error_type"], str) for r in rows if r["error_type"])
    assert {r["error_type"] for r in rows if r["error_type"]} <= set(ErrorType)
    assert rows[-1]["id"] == "r1" and rows[-1]["row_index"] == 11
    assert {(r["source_file"], r["unit"], r["unit_rows"]) for r in rows} == {
        (str(path), 0, len(rows))}


def test_ids_fall_back_to_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "plain.jsonl"
    path.write_bytes(jsonl_bytes([{"text": "a [MASK]"}, {"text": "b [MASK]"}]))
    assert [r["id"] for r in read_file(path)] == ["plain.jsonl:0", "plain.jsonl:1"]


def test_ids_of_the_wrong_type(tmp_path: Path) -> None:
    path = tmp_path / "ids.jsonl"
    path.write_bytes(jsonl_bytes([{"id": 7, "text": "a [MASK]"}, {"id": [1], "text": "b"},
                                  {"id": "", "text": "c [MASK]"}]))
    rows = read_file(path, id_column="id")
    assert [(r["id"], r["error_type"]) for r in rows] == [
        ("7", None), ("ids.jsonl:1", "wrong_type"), ("ids.jsonl:2", "missing_id")]


def test_compressed_jsonl(tmp_path: Path) -> None:
    data = jsonl_bytes(GOOD)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    for name in ("a.jsonl.gz", "b.jsonl.zst"):
        rows = read_file(tmp_path / name)
        assert [r["record"]["text"] for r in rows] == [g["text"] for g in GOOD]
        assert all(r["error_type"] is None for r in rows)
        assert all(r["unit_last"] and r["unit_damage"] is None for r in rows)


def test_columns_select_what_a_row_keeps(tmp_path: Path) -> None:
    path = tmp_path / "wide.jsonl"
    path.write_bytes(jsonl_bytes([{"key": "k1", "body": "b [MASK]", "lang": "en", "big": "x"}]))
    [row] = read_file(path, id_column="key", text_column="body", columns=["lang"],
                      keep_columns=["lang"])
    assert row["id"] == "k1" and row["error_type"] is None
    assert row["record"] == {"key": "k1", "body": "b [MASK]", "lang": "en"}  # no "big"


def test_parquet_columns_and_types(tmp_path: Path) -> None:
    table = pa.table({"doc": ["d0", "d1", "d2"], "text": ["a [MASK]", None, "c [MASK]"],
                      "lang": ["en", "de", "fr"], "big": ["x" * 10] * 3})
    pq.write_table(table, tmp_path / "t.parquet")
    rows = read_file(tmp_path / "t.parquet", id_column="doc", columns=["lang"],
                     keep_columns=["lang"])
    assert [r["id"] for r in rows] == ["d0", "d1", "d2"]
    assert [r["error_type"] for r in rows] == [None, "missing_text", None]
    assert rows[0]["record"] == {"doc": "d0", "text": "a [MASK]", "lang": "en"}  # no "big"
    binary = pa.table({"text": pa.array([b"ok [MASK]", b"\xff\xfe"], pa.binary())})
    pq.write_table(binary, tmp_path / "b.parquet")
    rows = read_file(tmp_path / "b.parquet")
    assert [r["error_type"] for r in rows] == [None, "invalid_utf8"]
    assert rows[0]["record"] == {"text": "ok [MASK]"}


def test_corrupt_parquet_is_an_unreadable_file(tmp_path: Path) -> None:
    """Not a row error and not a fault: the plan lists it (the job then fails on it unless
    `source.skip_unreadable_files`)."""
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl_bytes(GOOD))
    plan = plan_units([str(path), str(good)], source(str(tmp_path)), set(), set())
    assert list(plan.unreadable) == [str(path)] and plan.unreadable[str(path)]
    assert [u.uri for u in plan.units] == [str(good)]


def test_listing_dirs_globs_and_lists(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("a.jsonl", "sub/b.parquet", "sub/c.jsonl.gz", "notes.txt", "_SUCCESS",
                 ".hidden.jsonl"):
        (tmp_path / name).write_bytes(b"")
    found = list_files(source(str(tmp_path)))
    assert [Path(f).name for f in found] == ["a.jsonl", "b.parquet", "c.jsonl.gz"]
    assert [Path(f).name for f in list_files(source(str(tmp_path), format="parquet"))] == [
        "b.parquet"]
    globbed = list_files(source(f"{tmp_path}/**/*.jsonl*"))
    assert [Path(f).name for f in globbed] == ["a.jsonl", "c.jsonl.gz"]
    listed = list_files(source([str(tmp_path / "a.jsonl"), str(tmp_path / "a.jsonl")]))
    assert len(listed) == 1
    with pytest.raises(SourceError, match="does not exist"):
        list_files(source(str(tmp_path / "missing")))
    with pytest.raises(SourceError, match="matched no input files"):
        list_files(source(f"{tmp_path}/*.csv"))


def test_unsupported_scheme_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="unsupported scheme 'ftp'"):
        list_files(source("ftp://host/x.jsonl"))
