"""Work units below the file (plan.py) and reading them (read.py), without Ray.

Every unit of a file read one after the other must give every row of the file exactly once,
with the row index of the file, whatever the unit size; bad rows become error rows next to
good ones and never fail the unit.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.job.config import JobConfig
from pipeline.job.plan import file_keys, is_inside, plan_units
from pipeline.job.read import UnitReader
from pipeline.job.storage import OutputStore

pytestmark = pytest.mark.timeout(120)


def job(tmp_path: Path, paths: list[str], retry: dict | None = None,
        **source: object) -> JobConfig:
    return JobConfig.model_validate({
        "source": {"paths": paths, **source},
        "output": {"path": str(tmp_path / "out")},
        "retry": retry or {},
    })


def read_all(config: JobConfig, files: list[str]) -> list[dict]:
    """Plan every file, read every unit in order; the rows of non-empty units."""
    plan = plan_units(files, config.source, set(), set())
    rows = []
    for unit in plan.units:
        for block in UnitReader(unit, config.model_dump(mode="json"), "hash")():
            rows += block.to_pylist()
    return rows


LINES = [json.dumps({"id": f"r{i}", "text": f"line {i} " + "x" * (i % 7) + " [MASK]"})
         for i in range(40)]


@pytest.mark.parametrize("unit_bytes", [23, 64, 333, 10_000])
def test_jsonl_byte_ranges_give_every_line_once(tmp_path: Path, unit_bytes: int) -> None:
    lines = list(LINES)
    lines[5] = ""  # a blank line keeps its number but is not a row
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines))  # no newline after the last line
    config = job(tmp_path, [str(path)], unit_bytes=unit_bytes, id_column="id")
    plan = plan_units([str(path)], config.source, set(), set())
    assert len(plan.units) == -(-path.stat().st_size // unit_bytes)
    rows = read_all(config, [str(path)])
    expected = [i for i in range(40) if i != 5]
    assert [r["row_index"] for r in rows] == expected
    assert [r["id"] for r in rows] == [f"r{i}" for i in expected]
    assert all(r["error_type"] is None for r in rows)
    units = {r["unit"] for r in rows}
    assert all(r["unit_rows"] == sum(1 for x in rows if x["unit"] == r["unit"]) for r in rows)
    if unit_bytes <= 64:
        assert len(units) > 1  # the file really was cut


def test_ranges_of_one_byte(tmp_path: Path) -> None:
    """Every byte its own range: a line belongs to the range where it starts, and ranges
    inside a line or on its newline hold nothing."""
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"text": "a [MASK]"}\n\n{"text": "b [MASK]"}\n{"text": "c [MASK]"}')
    config = job(tmp_path, [str(path)], unit_bytes=1)
    assert [(r["row_index"], json.loads(r["record"])["text"])
            for r in read_all(config, [str(path)])] == [
        (0, "a [MASK]"), (2, "b [MASK]"), (3, "c [MASK]")]


def test_parquet_units_group_whole_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    table = pa.table({"text": [f"row {i} [MASK]" for i in range(1000)]})
    pq.write_table(table, path, row_group_size=100)
    config = job(tmp_path, [str(path)], unit_rows=250)
    plan = plan_units([str(path)], config.source, set(), set())
    assert [(u.start, u.stop, u.first_row, u.rows) for u in plan.units] == [
        (0, 2, 0, 200), (2, 4, 200, 200), (4, 6, 400, 200), (6, 8, 600, 200),
        (8, 10, 800, 200)]
    assert plan.rows_known == 1000
    rows = read_all(config, [str(path)])
    assert [r["row_index"] for r in rows] == list(range(1000))
    assert [json.loads(r["record"])["text"] for r in rows] == table.column("text").to_pylist()


def test_committed_units_are_left_out(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["a [MASK]"] * 30}), path, row_group_size=10)
    config = job(tmp_path, [str(path)], unit_rows=10)
    units = plan_units([str(path)], config.source, set(), set()).units
    left = plan_units([str(path)], config.source, {units[1].part}, set()).units
    assert [u.index for u in left] == [0, 2]


def test_compressed_stream_units_and_the_last_one(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(LINES) + "\n").encode()))
    config = job(tmp_path, [str(path)], unit_rows=15)
    plan = plan_units([str(path)], config.source, set(), set())
    assert len(plan.units) == 1 and plan.units[0].index is None
    blocks = list(UnitReader(plan.units[0], config.model_dump(mode="json"), "hash")())
    assert [b.num_rows for b in blocks] == [15, 15, 10]
    assert [b.column("unit_last").to_pylist()[0] for b in blocks] == [False, False, True]
    rows = [r for b in blocks for r in b.to_pylist()]
    assert [r["row_index"] for r in rows] == list(range(40))
    assert plan_units([str(path)], config.source, set(), {str(path)}).units == []


def test_truncated_archive_keeps_every_complete_line(tmp_path: Path) -> None:
    body = "".join(json.dumps({"text": f"row {i} [MASK] " + "y" * 50}) + "\n"
                   for i in range(400)).encode()
    data = gzip.compress(body)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[:len(data) // 2])
    config = job(tmp_path, [str(path)], unit_rows=1000)
    [unit] = plan_units([str(path)], config.source, set(), set()).units
    [block] = list(UnitReader(unit, config.model_dump(mode="json"), "hash")())
    rows = block.to_pylist()
    decodable = zlib.decompressobj(wbits=31).decompress(data[:len(data) // 2])
    assert len(rows) == decodable.count(b"\n")  # every line that arrived whole
    assert [r["row_index"] for r in rows] == list(range(len(rows)))
    assert all(r["error_type"] is None for r in rows)  # no cut line, no fake row
    assert rows[0]["unit_last"] and "truncated" in rows[0]["unit_damage"]


def test_poisonous_rows_are_error_rows_beside_good_ones(tmp_path: Path) -> None:
    path = tmp_path / "poison.jsonl"
    lines = [
        b'\xef\xbb\xbf{"text": "a BOM before the first line [MASK]"}',
        b'{"text": "bad \\ud800 [MASK]"}',  # valid JSON, a lone surrogate
        b'{"text": "nul \\u0000 escaped [MASK]"}',
        b'{"text": "' + b"h" * 5000 + b' [MASK]"}',
        b'{"text": "caf\xe9 [MASK]"}',
        b'{"text": "fine [MASK]"}',
        b'{"text": "raw \x00 nul [MASK]"}',  # JSON forbids raw control characters
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    config = job(tmp_path, [str(path)], max_line_bytes=1000)
    rows = read_all(config, [str(path)])
    assert [(r["row_index"], r["error_type"]) for r in rows] == [
        (0, None), (1, "invalid_text"), (2, None), (3, "line_too_long"), (4, "invalid_utf8"),
        (5, None), (6, "invalid_json")]
    assert json.loads(rows[0]["record"])["text"].startswith("a BOM")
    assert "\x00" in json.loads(rows[2]["record"])["text"]


def test_empty_units_are_committed_by_the_reader(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    config = job(tmp_path, [str(path)])
    [unit] = plan_units([str(path)], config.source, set(), set()).units
    assert list(UnitReader(unit, config.model_dump(mode="json"), "hash")()) == []
    store = OutputStore(config.output.path, config.source.storage)
    assert list(store.committed()) == [unit.part]
    assert store.read_part(unit.part).num_rows == 0


def test_fallback_ids_are_unique_across_folders(tmp_path: Path) -> None:
    uris = [str(tmp_path / "a" / "x.jsonl"), str(tmp_path / "b" / "x.jsonl")]
    assert file_keys(uris) == {uris[0]: "a/x.jsonl", uris[1]: "b/x.jsonl"}
    assert file_keys(uris[:1]) == {uris[0]: "x.jsonl"}
    for uri in uris:
        Path(uri).parent.mkdir(parents=True)
        Path(uri).write_text('{"text": "no id [MASK]"}\n')
    rows = read_all(job(tmp_path, [str(tmp_path)]), uris)
    assert [r["id"] for r in rows] == ["a/x.jsonl:0", "b/x.jsonl:0"]


def test_output_inside_input_is_detected() -> None:
    assert is_inside("/data/in/out", "/data/in")
    assert is_inside("s3://b/in/out", "s3://b/in/")
    assert not is_inside("/data/input2", "/data/in")
    assert not is_inside("s3://b/out", "s3://b/in")


def test_a_file_changed_after_planning_is_a_fault(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    config = job(tmp_path, [str(path)], retry={"attempts": 1})
    [unit] = plan_units([str(path)], config.source, set(), set()).units
    path.write_text("\n".join(LINES[:3]) + "\n")
    with pytest.raises(OSError, match="changed since the job was planned"):
        list(UnitReader(unit, config.model_dump(mode="json"), "hash")())


def test_units_know_the_bytes_they_read(tmp_path: Path) -> None:
    """What sizes the read-ahead budget (backpressure.py): a JSONL range's bytes, a Parquet
    unit's uncompressed row groups; a compressed stream's are unknown."""
    lines = tmp_path / "in.jsonl"
    lines.write_text("\n".join(LINES) + "\n")
    size = lines.stat().st_size
    config = job(tmp_path, [str(lines)], unit_bytes=size // 3 + 1)
    assert sum(u.data_bytes for u in plan_units([str(lines)], config.source, set(),
                                                set()).units) == size
    table = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": [f"row {i} [MASK]" for i in range(1000)]}), table,
                   row_group_size=100)
    groups = pq.ParquetFile(table).metadata
    config = job(tmp_path, [str(table)], unit_rows=250)
    units = plan_units([str(table)], config.source, set(), set()).units
    assert [u.data_bytes for u in units] == [
        sum(groups.row_group(g).total_byte_size for g in range(u.start, u.stop)) for u in units]
    archive = tmp_path / "in.jsonl.gz"
    archive.write_bytes(gzip.compress(lines.read_bytes()))
    assert plan_units([str(archive)], config.source, set(), set()).units[0].data_bytes is None


def test_read_ahead_budget_follows_the_actors_and_the_largest_unit(tmp_path: Path) -> None:
    from pipeline.job.backpressure import (
        BLOCK_GROWTH,
        MIN_BUDGET,
        UNITS_IN_FLIGHT,
        object_store_budget,
    )

    lines = tmp_path / "in.jsonl"
    lines.write_bytes(b'{"text": "a [MASK]"}\n' * 2**20)  # 21 MiB: ranges of 8, 8, 5 MiB
    config = job(tmp_path, [str(lines)], unit_bytes=8 * 2**20)
    units = plan_units([str(lines)], config.source, set(), set()).units
    per_actor = BLOCK_GROWTH * 8 * 2**20 * (UNITS_IN_FLIGHT + 4)
    assert object_store_budget(units, 1, 4) == per_actor
    assert object_store_budget(units, 3, 4) == 3 * per_actor
    assert object_store_budget(units[-1:], 1, 0) is None  # Ray Data's own budget
    assert object_store_budget(units[:0], 1, 4) is None
    small = tmp_path / "small.jsonl"
    small.write_bytes(b'{"text": "a [MASK]"}\n' * 20)
    tiny = plan_units([str(small)], job(tmp_path, [str(small)], unit_bytes=100).source,
                      set(), set()).units
    assert object_store_budget(tiny, 1, 4) == MIN_BUDGET
