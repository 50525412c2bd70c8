"""Writing outputs on the local filesystem: part names, the output schema, the write stage
that commits each unit atomically, the output store and the storage helpers.

The same code against S3 runs in tests/e2e/test_storage_s3.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipeline.job.config import validate
from pipeline.job.plan import part_name
from pipeline.job.rows import WORK_SCHEMA
from pipeline.job.scoring import QUALITY_COLUMNS
from pipeline.job.storage import (
    MANIFEST,
    TMP_DIR,
    OutputError,
    OutputStore,
    SourceFormat,
    StorageConfig,
    StorageError,
    file_format,
    is_data_file,
    resolve,
    strip_data_suffix,
)
from pipeline.job.write import COMMIT_SCHEMA, assemble, unit_stats, write_empty_unit, write_units
from schemas.output import (
    META_CONFIG_HASH,
    META_DAMAGE,
    META_LAST_UNIT,
    META_SCHEMA_VERSION,
    META_SOURCE_FILE,
    META_UNIT,
    OUTPUT_SCHEMA,
    SCHEMA_VERSION,
)

pytestmark = pytest.mark.timeout(60)
HASH = "h" * 64


def test_part_names_are_stable_and_distinct() -> None:
    assert part_name("s3://b/x/data.jsonl.gz", 0) == part_name("s3://b/x/data.jsonl.gz", 0)
    assert part_name("s3://b/x/data.jsonl.gz", 0) != part_name("s3://b/y/data.jsonl.gz", 0)
    assert part_name("s3://b/x/data.jsonl.gz", 0) != part_name("s3://b/x/data.jsonl.gz", 1)
    assert part_name("/d/my file.parquet", 3).endswith("-my_file-00003.parquet")
    assert part_name("/d/x.jsonl.zst", 0).endswith("-x-00000.parquet")


def work_rows(source_file: str, n: int, unit: int = 0, last: bool = True,
              damage: str | None = None, first: int = 0) -> pa.Table:
    """The generate stage's output for one whole unit of `n` rows."""
    rows = [dict(id=f"x:{i}", source_file=source_file, row_index=i, record=json.dumps(
                     {"lang": "en", "n": i}), prompt="t [MASK]", prompt_token_ids=[1, 2],
                 output_text="t a", prompt_tokens=2, output_tokens=1,
                 fills=[dict(mask="[MASK]", text="a", token_ids=[5], finish_reason="stop")],
                 unit=unit, unit_rows=n, unit_last=last, unit_damage=damage,
                 generated_by="node1:42")
            for i in range(first, first + n)]
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


def job_dict(out: Path, **sections: Any) -> dict[str, Any]:
    raw = {"source": {"paths": "x"}, "output": {"path": str(out)}, **sections}
    return validate(raw).model_dump(mode="json")


def test_work_schema_is_the_output_schema_in_flight() -> None:
    """Every per-row output column, nullable, plus what the stages pass along; no `text`."""
    job_columns = {"model", "engine", "multi_mask"}
    assert WORK_SCHEMA.names[:len(OUTPUT_SCHEMA) - len(job_columns)] == [
        n for n in OUTPUT_SCHEMA.names if n not in job_columns]
    assert {"unit", "unit_rows", "record"} <= set(WORK_SCHEMA.names)
    assert all(field.nullable for field in WORK_SCHEMA)
    assert "text" not in WORK_SCHEMA.names


def test_write_stage_commits_every_unit_of_a_block(tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = job_dict(out, source={"paths": "x", "keep_columns": ["lang", "n"]})
    block = pa.concat_tables([work_rows("/in/a.jsonl", 5, unit=1, first=5).take([3, 0, 4, 1, 2]),
                              work_rows("/in/b.jsonl.gz", 2, unit=0, last=False)])
    records = write_units(block, job, HASH)
    assert records.schema == COMMIT_SCHEMA
    by_part = {r["part"]: r for r in records.to_pylist()}
    a, b = part_name("/in/a.jsonl", 1), part_name("/in/b.jsonl.gz", 0)
    assert set(by_part) == {a, b}
    assert {k: by_part[a][k] for k in ("source_file", "unit", "last", "damage", "rows", "ok",
                                       "error", "prompt_tokens", "output_tokens")} == {
        "source_file": "/in/a.jsonl", "unit": 1, "last": True, "damage": None, "rows": 5,
        "ok": 5, "error": 0, "prompt_tokens": 10, "output_tokens": 5}
    assert json.loads(by_part[a]["error_types"]) == {}
    assert json.loads(by_part[a]["quality"]) == {}  # no target, nothing scored
    assert by_part[a]["generated_by"] == ["node1:42"] and by_part[a]["node"]
    store = OutputStore(str(out), StorageConfig())
    committed = store.committed()
    assert set(committed) == {a, b}
    table = store.read_part(a)
    assert table.schema.names == OUTPUT_SCHEMA.names + ["lang", "n"]
    assert table.column("row_index").to_pylist() == [5, 6, 7, 8, 9]  # sorted
    assert table.column("n").type == pa.int64()
    metadata = committed[a].metadata
    assert (metadata[META_CONFIG_HASH], metadata[META_SOURCE_FILE]) == (
        HASH.encode(), b"/in/a.jsonl")
    assert (metadata[META_UNIT], metadata[META_LAST_UNIT]) == (b"1", b"true")
    assert committed[b].metadata[META_LAST_UNIT] == b"false"
    assert not list((out / TMP_DIR).iterdir())  # temporary names were moved


def test_write_stage_never_commits_part_of_a_unit(tmp_path: Path) -> None:
    job = job_dict(tmp_path / "out")
    with pytest.raises(RuntimeError, match="3 of 4 rows arrived together"):
        write_units(work_rows("/in/b.jsonl", 4).slice(1), job, HASH)
    assert OutputStore(str(tmp_path / "out"), StorageConfig()).committed() == {}


def test_damage_and_error_counts_are_recorded(tmp_path: Path) -> None:
    job = job_dict(tmp_path / "out")
    rows = work_rows("/in/c.jsonl.gz", 3, damage="truncated gzip stream")
    errors = pa.array([None, "no_mask", "no_mask"], pa.string())
    rows = rows.set_column(rows.schema.get_field_index("error_type"), "error_type", errors)
    [record] = write_units(rows, job, HASH).to_pylist()
    assert (record["rows"], record["ok"], record["error"]) == (3, 1, 2)
    assert json.loads(record["error_types"]) == {"no_mask": 2}
    assert record["damage"] == "truncated gzip stream"
    meta = OutputStore(str(tmp_path / "out"), StorageConfig()).committed()[record["part"]]
    assert meta.metadata[META_DAMAGE] == b"truncated gzip stream"


def test_an_empty_unit_gets_an_empty_part(tmp_path: Path) -> None:
    config = validate({"source": {"paths": "x"}, "output": {"path": str(tmp_path / "out")}})
    write_empty_unit(config, HASH, "/in/empty.jsonl", 0, True, None)
    store = OutputStore(config.output.path, StorageConfig())
    assert list(store.committed()) == [part_name("/in/empty.jsonl", 0)]
    table = store.read_part(part_name("/in/empty.jsonl", 0))
    assert table.num_rows == 0 and table.schema.names == OUTPUT_SCHEMA.names


def test_assemble_adds_the_job_columns_and_metadata() -> None:
    config = validate({"source": {"paths": "x"}, "output": {"path": "o"},
                       "model": {"path": "/models/glm"},
                       "sampling": {"multi_mask": "sequential"}})
    rows = work_rows("/in/a.jsonl", 3)
    table = assemble(rows.take([2, 0, 1]), config, HASH, "/in/a.jsonl", 0, True, None)
    assert table.schema.names == OUTPUT_SCHEMA.names
    assert table.column("row_index").to_pylist() == [0, 1, 2]  # sorted
    assert {name: table.column(name).unique().to_pylist()
            for name in ("model", "engine", "multi_mask")} == {
        "model": ["/models/glm"], "engine": ["torch"], "multi_mask": ["sequential"]}
    metadata = table.schema.metadata
    assert metadata[META_SOURCE_FILE] == b"/in/a.jsonl"
    assert metadata[META_CONFIG_HASH] == HASH.encode() and metadata[META_SCHEMA_VERSION]
    assert META_DAMAGE not in metadata


def test_assemble_keeps_mixed_columns_as_json() -> None:
    config = validate({"source": {"paths": "x", "keep_columns": ["meta"]},
                       "output": {"path": "o"}})
    rows = work_rows("/in/a.jsonl", 2)
    records = [json.dumps({"meta": 1}), json.dumps({"meta": {"k": "v"}})]
    rows = rows.set_column(rows.schema.get_field_index("record"), "record",
                           pa.array(records, pa.string()))
    table = assemble(rows, config, "h", "/in/a.jsonl", 0, True, None)
    assert table.column("meta").to_pylist() == ["1", '{"k": "v"}']


def fill(mask: str) -> dict[str, Any]:
    return dict(mask=mask, text="a", token_ids=[5], finish_reason="stop")


def test_unit_stats_count_errors_tokens_and_score_sums() -> None:
    rows = [dict(error_type="no_mask", prompt_tokens=0),
            dict(prompt_tokens=4, output_tokens=2, fills=[fill("[MASK]"), fill("[sMASK]")],
                 blank_exact_match=[True, False], blank_token_f1=[1.0, 0.5], exact_match=False,
                 token_f1=0.75),
            dict(prompt_tokens=5, output_tokens=3, fills=[fill("[MASK]")])]  # no target
    schema = pa.schema([OUTPUT_SCHEMA.field(name) for name in (
        "error_type", "prompt_tokens", "output_tokens", *QUALITY_COLUMNS)])
    assert unit_stats(pa.Table.from_pylist(rows, schema)) == {
        "rows": 3, "ok": 2, "error": 1, "prompt_tokens": 9, "output_tokens": 5,
        "error_types": {"no_mask": 1},
        "quality": {"[MASK]": {"count": 1, "exact": 1, "f1_sum": 1.0},
                    "[sMASK]": {"count": 1, "exact": 0, "f1_sum": 0.5},
                    "rows": {"count": 1, "exact": 0, "f1_sum": 0.75}}}


def test_output_store_manifest_tmp_and_clear(tmp_path: Path) -> None:
    store = OutputStore(str(tmp_path / "out"), StorageConfig())
    assert store.read_manifest() is None and store.committed() == {}
    store.clear_tmp()  # nothing there: no error
    store.write_manifest({"status": "running", "n": 1})
    assert json.loads((tmp_path / "out" / MANIFEST).read_text()) == {"status": "running", "n": 1}
    assert store.read_manifest() == {"status": "running", "n": 1}
    name = part_name("/in/a.jsonl", 0)
    config = validate({"source": {"paths": "x"}, "output": {"path": "o"}})
    store.write_part(name, assemble(work_rows("/in/a.jsonl", 2), config, "h", "/in/a.jsonl", 0,
                                    True, None))
    (tmp_path / "out" / "notes.txt").write_text("not a part")
    (tmp_path / "out" / TMP_DIR / "part-leftover.parquet.123").write_bytes(b"half")
    assert set(store.committed()) == {name}
    assert store.read_part(name, ["row_index"]).column_names == ["row_index"]
    store.clear()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


def test_data_files_formats_and_suffixes() -> None:
    assert is_data_file("/d/a.jsonl.gz", SourceFormat.AUTO)
    assert is_data_file("s3://b/A.PARQUET", SourceFormat.PARQUET)
    assert not is_data_file("/d/a.jsonl", SourceFormat.PARQUET)
    assert not is_data_file("/d/_SUCCESS.jsonl", SourceFormat.AUTO)
    assert not is_data_file("/d/.hidden.parquet", SourceFormat.AUTO)
    assert not is_data_file("/d/notes.txt", SourceFormat.AUTO)
    assert file_format("/d/a.pq", SourceFormat.AUTO) is SourceFormat.PARQUET
    assert file_format("/d/a.txt", SourceFormat.AUTO) is SourceFormat.JSONL
    assert file_format("/d/a.txt", SourceFormat.PARQUET) is SourceFormat.PARQUET
    assert strip_data_suffix("part-000.jsonl.gz") == "part-000"
    assert strip_data_suffix("x.ndjson.zst") == "x" and strip_data_suffix("x.csv") == "x.csv"


def test_resolve_schemes(monkeypatch: pytest.MonkeyPatch) -> None:
    fs, path = resolve("file:///tmp/x.jsonl", StorageConfig())
    assert isinstance(fs, pafs.LocalFileSystem) and path == "/tmp/x.jsonl"
    with pytest.raises(StorageError, match="unsupported scheme 'ftp'"):
        resolve("ftp://host/x", StorageConfig())
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_NAME", raising=False)
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT", raising=False)
    with pytest.raises(StorageError, match="AZURE_STORAGE_ACCOUNT_NAME"):
        resolve("az://container/x", StorageConfig())


def test_a_run_is_complete_only_when_every_planned_unit_has_its_part(tmp_path: Path) -> None:
    """The end-of-run check lists the output once: commit records describe the parts of this
    run, only the empty units (committed by their readers, without a record) have their
    footers read; a compressed file counts as done once its last unit is there."""
    from pipeline.job.manifest import RunManifest
    from pipeline.job.plan import Plan, Unit
    from pipeline.job.runner import InfillJob, InfrastructureError
    from pipeline.job.storage import SourceFormat

    config = validate({"source": {"paths": "x"}, "output": {"path": str(tmp_path / "out")}})
    job_config = config.model_dump(mode="json")
    store = OutputStore(config.output.path, StorageConfig())
    run = RunManifest(config, store, ["/in/a.jsonl", "/in/b.jsonl.gz"], lambda line: None)
    units = [Unit("/in/a.jsonl", "a.jsonl", SourceFormat.JSONL, index=0),
             Unit("/in/a.jsonl", "a.jsonl", SourceFormat.JSONL, index=1),
             Unit("/in/b.jsonl.gz", "b.jsonl.gz", SourceFormat.JSONL, index=None)]
    plan = Plan(units, {}, 0, 0)
    job = InfillJob(config)

    def commit(rows: pa.Table) -> None:
        for record in write_units(rows, job_config, HASH).to_pylist():
            run.add_part({**record, "error_types": json.loads(record["error_types"]),
                          "quality": json.loads(record["quality"])}, "committed")

    commit(work_rows("/in/a.jsonl", 3, unit=0, last=False))
    commit(work_rows("/in/b.jsonl.gz", 2, unit=0, last=False))
    with pytest.raises(InfrastructureError, match=r"2 unit\(s\) were not committed.*-a-00001"):
        job._check_complete(run, store, plan)
    write_empty_unit(config, HASH, "/in/a.jsonl", 1, True, None)
    with pytest.raises(InfrastructureError, match=r"1 unit\(s\).*the end of /in/b.jsonl.gz"):
        job._check_complete(run, store, plan)
    commit(work_rows("/in/b.jsonl.gz", 1, unit=1, last=True, first=2))
    job._check_complete(run, store, plan)
    empty = run.parts[part_name("/in/a.jsonl", 1)]
    assert (empty["rows"], empty["last"], empty["status"]) == (0, True, "committed")
    assert sorted(p["rows"] for p in run.parts.values()) == [0, 1, 2, 3]


def test_parts_of_another_schema_version_are_not_resumed(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Their columns are not this version's (resume reads the score columns of every part)."""
    import pipeline.job.runner as runner

    config = validate({"source": {"paths": "x"}, "output": {"path": str(tmp_path / "out")}})
    write_units(work_rows("/in/a.jsonl", 2), config.model_dump(mode="json"), HASH)
    store = OutputStore(config.output.path, StorageConfig())
    job = runner.InfillJob(config)
    assert set(job._check_output(store, HASH)) == {part_name("/in/a.jsonl", 0)}
    monkeypatch.setattr(runner, "SCHEMA_VERSION", "next")
    with pytest.raises(OutputError, match=f"schema version {SCHEMA_VERSION}, this version "
                                          "writes next; set output.overwrite"):
        job._check_output(store, HASH)
