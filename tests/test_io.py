"""Reading shards (local and S3, Parquet and JSONL, bad rows) and committing outputs."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.config import SourceConfig, load_config, validate
from pipeline.sinks import OutputStore, ShardWriter, assemble, part_name
from pipeline.sources import SourceError, list_shards, read_shard
from pipeline.stages import WORK_SCHEMA
from schemas.output import META_CONFIG_HASH, OUTPUT_SCHEMA
from tests.s3 import BUCKET, SeaweedS3

pytestmark = pytest.mark.timeout(120)

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


def source(paths: list[str] | str, **options) -> SourceConfig:
    return SourceConfig.model_validate({"paths": paths, **options})


def test_bad_rows_become_error_rows(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_CORPUS) + b"\n")
    rows = read_shard(str(path), source(str(path), id_column="id"))
    expected = [(i, kind) for i, (line, kind) in enumerate(BAD_CORPUS) if line]
    assert [(r["row_index"], r["error_type"]) for r in rows] == [
        (i, "missing_id" if i == 10 else kind) for i, kind in expected]
    assert rows[0]["id"] == "r0" and rows[0]["text"] == GOOD[0]["text"]
    assert rows[1]["id"] == "bad.jsonl:1"  # unparsable: the id comes from file and line
    assert all(r["error_message"] for r in rows if r["error_type"])
    assert rows[-1]["id"] == "r1" and rows[-1]["row_index"] == 11


def test_ids_fall_back_to_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "plain.jsonl"
    path.write_bytes(jsonl_bytes([{"text": "a [MASK]"}, {"text": "b [MASK]"}]))
    rows = read_shard(str(path), source(str(path)))
    assert [r["id"] for r in rows] == ["plain.jsonl:0", "plain.jsonl:1"]


def test_compressed_jsonl(tmp_path: Path) -> None:
    data = jsonl_bytes(GOOD)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    for name in ("a.jsonl.gz", "b.jsonl.zst"):
        rows = read_shard(str(tmp_path / name), source(str(tmp_path)))
        assert [r["text"] for r in rows] == [g["text"] for g in GOOD]
        assert all(r["error_type"] is None for r in rows)


def test_truncated_archive_keeps_what_was_read(tmp_path: Path) -> None:
    records = [{"text": f"row {i} [MASK] {os.urandom(100).hex()}"} for i in range(2000)]
    data = gzip.compress(jsonl_bytes(records))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    rows = read_shard(str(path), source(str(path)))
    assert rows[-1]["error_type"] == "read_error"
    assert 0 < len(rows) - 1 < len(records)
    assert all(r["error_type"] is None for r in rows[:-1])


def test_parquet_columns_and_types(tmp_path: Path) -> None:
    table = pa.table({"doc": ["d0", "d1", "d2"], "text": ["a [MASK]", None, "c [MASK]"],
                      "lang": ["en", "de", "fr"], "big": ["x" * 10] * 3})
    pq.write_table(table, tmp_path / "t.parquet")
    config = source(str(tmp_path), id_column="doc", columns=["lang"], keep_columns=["lang"])
    rows = read_shard(str(tmp_path / "t.parquet"), config)
    assert [r["id"] for r in rows] == ["d0", "d1", "d2"]
    assert [r["error_type"] for r in rows] == [None, "missing_text", None]
    assert rows[0]["record"] == {"doc": "d0", "text": "a [MASK]", "lang": "en"}  # no "big"
    binary = pa.table({"text": pa.array([b"ok [MASK]", b"\xff\xfe"], pa.binary())})
    pq.write_table(binary, tmp_path / "b.parquet")
    rows = read_shard(str(tmp_path / "b.parquet"), source(str(tmp_path)))
    assert [r["error_type"] for r in rows] == [None, "invalid_utf8"]


def test_corrupt_parquet_is_one_error_row(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    rows = read_shard(str(path), source(str(path)))
    assert [(r["row_index"], r["error_type"]) for r in rows] == [(0, "read_error")]


def test_listing_dirs_globs_and_lists(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("a.jsonl", "sub/b.parquet", "sub/c.jsonl.gz", "notes.txt", "_SUCCESS",
                 ".hidden.jsonl"):
        (tmp_path / name).write_bytes(b"")
    found = list_shards(source(str(tmp_path)))
    assert [Path(f).name for f in found] == ["a.jsonl", "b.parquet", "c.jsonl.gz"]
    assert [Path(f).name for f in list_shards(source(str(tmp_path), format="parquet"))] == [
        "b.parquet"]
    globbed = list_shards(source(f"{tmp_path}/**/*.jsonl*"))
    assert [Path(f).name for f in globbed] == ["a.jsonl", "c.jsonl.gz"]
    listed = list_shards(source([str(tmp_path / "a.jsonl"), str(tmp_path / "a.jsonl")]))
    assert len(listed) == 1
    with pytest.raises(SourceError, match="does not exist"):
        list_shards(source(str(tmp_path / "missing")))
    with pytest.raises(SourceError, match="matched no input files"):
        list_shards(source(f"{tmp_path}/*.csv"))


def test_part_names_are_stable_and_distinct() -> None:
    assert part_name("s3://b/x/data.jsonl.gz") == part_name("s3://b/x/data.jsonl.gz")
    assert part_name("s3://b/x/data.jsonl.gz") != part_name("s3://b/y/data.jsonl.gz")
    assert part_name("/d/my file.parquet").endswith("-my_file.parquet")


def work_rows(source_file: str, n: int) -> pa.Table:
    rows = [dict(id=f"x:{i}", source_file=source_file, row_index=i, shard_rows=n,
                 text="t [MASK]", record=json.dumps({"lang": "en", "n": i}),
                 prompt="t [MASK]", prompt_token_ids=[1, 2], output_text="t a",
                 fills=[dict(mask="[MASK]", text="a", token_ids=[5], finish_reason="stop")],
                 prompt_tokens=2, output_tokens=1) for i in range(n)]
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


def test_writer_commits_complete_shards_only(tmp_path: Path) -> None:
    config = validate({"source": {"paths": "x", "keep_columns": ["lang", "n"]},
                       "output": {"path": str(tmp_path / "out")}})
    store, commits = OutputStore(config), []
    writer = ShardWriter(store, config, "h" * 64, lambda s, e: commits.append((s, e)))
    rows = work_rows("/in/a.jsonl", 5)
    writer.add(rows.slice(3))  # out of order, in two pieces
    assert commits == [] and store.committed() == {}
    writer.add(rows.slice(0, 3))
    assert [c[0] for c in commits] == ["/in/a.jsonl"]
    writer.finish(["/in/a.jsonl", "/in/empty.jsonl"])  # an empty file gets an empty part
    committed = store.committed()
    assert set(committed) == {part_name("/in/a.jsonl"), part_name("/in/empty.jsonl")}
    table = store.read_part(part_name("/in/a.jsonl"))
    assert table.schema.names == OUTPUT_SCHEMA.names + ["lang", "n"]
    assert table.column("row_index").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("n").type == pa.int64()
    assert committed[part_name("/in/a.jsonl")].metadata[META_CONFIG_HASH] == b"h" * 64
    assert not list((tmp_path / "out" / "_tmp").iterdir())  # temporary names were moved
    partial = ShardWriter(store, config, "h" * 64, lambda s, e: None)
    partial.add(work_rows("/in/b.jsonl", 4).slice(1))
    with pytest.raises(RuntimeError, match="received 3 of 4 rows"):
        partial.finish(["/in/b.jsonl"])


def test_assemble_keeps_mixed_columns_as_json() -> None:
    config = validate({"source": {"paths": "x", "keep_columns": ["meta"]},
                       "output": {"path": "o"}})
    rows = work_rows("/in/a.jsonl", 2)
    records = [json.dumps({"meta": 1}), json.dumps({"meta": {"k": "v"}})]
    rows = rows.set_column(rows.schema.get_field_index("record"), "record",
                           pa.array(records, pa.string()))
    table = assemble(rows, config, "h", "/in/a.jsonl")
    assert table.column("meta").to_pylist() == ["1", '{"k": "v"}']


@pytest.mark.slow
def test_s3_listing_reading_writing(s3: SeaweedS3, tmp_path: Path) -> None:
    client = s3.client()
    client.put_object(Bucket=BUCKET, Key="io/in/a.jsonl", Body=jsonl_bytes(GOOD))
    client.put_object(Bucket=BUCKET, Key="io/in/deep/b.jsonl.gz",
                      Body=gzip.compress(b"{oops\n" + jsonl_bytes(GOOD)))
    client.put_object(Bucket=BUCKET, Key="io/in/_ignored.jsonl", Body=b"")
    storage = {"endpoint_url": s3.endpoint}
    config = source(f"s3://{BUCKET}/io/in", storage=storage)
    shards = list_shards(config)
    assert shards == [f"s3://{BUCKET}/io/in/a.jsonl", f"s3://{BUCKET}/io/in/deep/b.jsonl.gz"]
    assert list_shards(source(f"s3://{BUCKET}/io/in/*/*.gz", storage=storage)) == shards[1:]
    rows = read_shard(shards[1], config)
    assert [r["error_type"] for r in rows] == ["invalid_json", None, None, None]

    job = validate({"source": {"paths": "x", "storage": storage},
                    "output": {"path": f"s3://{BUCKET}/io/out"}})
    store = OutputStore(job)
    ShardWriter(store, job, "h" * 64, lambda s, e: None).add(work_rows(shards[0], 2))
    store.write_manifest({"status": "test"})
    store.clear_tmp()
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix="io/out/")["Contents"]
    keys = {o["Key"] for o in listing if not o["Key"].endswith("/")}  # no directory markers
    assert keys == {f"io/out/{part_name(shards[0])}", "io/out/_manifest.json"}
    assert store.read_manifest() == {"status": "test"}
    bad_keys = pafs.S3FileSystem(access_key="AKIAWRONG", secret_key="wrong",
                                 endpoint_override=s3.endpoint, region="us-east-1")
    with pytest.raises(OSError):
        bad_keys.get_file_info(f"{BUCKET}/io/in/a.jsonl")


@pytest.mark.slow
def test_config_from_object_storage(s3: SeaweedS3) -> None:
    body = b"source: {paths: s3://b/in}\noutput: {path: s3://b/out}\nsampling: {seed: 3}\n"
    s3.client().put_object(Bucket=BUCKET, Key="configs/job.yaml", Body=body)
    config = load_config(f"s3://{BUCKET}/configs/job.yaml", ["sampling.top_k=5"])
    assert config.sampling.seed == 3 and config.sampling.top_k == 5
