"""Reading, listing and writing on a real S3 server (SeaweedFS), and a job config from S3.

The local-file side of the same code is in tests/unit/job/test_read.py and test_write.py.
"""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipeline.job.config import SourceConfig, load_config, validate
from pipeline.job.plan import list_files, part_name, plan_units
from pipeline.job.read import UnitReader
from pipeline.job.rows import WORK_SCHEMA
from pipeline.job.storage import OutputStore
from pipeline.job.write import write_units
from tests.e2e.s3 import BUCKET, REGION, SeaweedS3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

GOOD = [{"id": f"r{i}", "text": f"Row {i} is [MASK].", "lang": "en"} for i in range(3)]


def jsonl_bytes(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def source(paths: list[str] | str, **options) -> SourceConfig:
    return SourceConfig.model_validate({"paths": paths, **options})


def work_rows(source_file: str, n: int) -> pa.Table:
    """The generate stage's output for unit 0 (all of it) of `source_file`."""
    rows = [dict(id=f"x:{i}", source_file=source_file, row_index=i, record=json.dumps({"n": i}),
                 prompt="t [MASK]", prompt_token_ids=[1, 2], output_text="t a",
                 prompt_tokens=2, output_tokens=1, unit=0, unit_rows=n, unit_last=True,
                 fills=[dict(mask="[MASK]", text="a", token_ids=[5], finish_reason="stop")])
            for i in range(n)]
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA)


def test_s3_listing_reading_writing(s3: SeaweedS3) -> None:
    client = s3.client()
    client.put_object(Bucket=BUCKET, Key="io/in/a.jsonl", Body=jsonl_bytes(GOOD))
    client.put_object(Bucket=BUCKET, Key="io/in/deep/b.jsonl.gz",
                      Body=gzip.compress(b"{oops\n" + jsonl_bytes(GOOD)))
    client.put_object(Bucket=BUCKET, Key="io/in/_ignored.jsonl", Body=b"")
    storage = {"endpoint_url": s3.endpoint}
    config = source(f"s3://{BUCKET}/io/in", storage=storage)
    files = list_files(config)
    assert files == [f"s3://{BUCKET}/io/in/a.jsonl", f"s3://{BUCKET}/io/in/deep/b.jsonl.gz"]
    assert list_files(source(f"s3://{BUCKET}/io/in/*/*.gz", storage=storage)) == files[1:]

    job = validate({"source": {"paths": f"s3://{BUCKET}/io/in", "storage": storage},
                    "output": {"path": f"s3://{BUCKET}/io/out"}})
    plan = plan_units(files, job.source, set(), set())
    assert [u.uri for u in plan.units] == files and not plan.unreadable
    reader = UnitReader(plan.units[1], job.model_dump(mode="json"), "h" * 64)
    rows = [row for block in reader() for row in block.to_pylist()]
    assert [r["error_type"] for r in rows] == ["invalid_json", None, None, None]
    assert json.loads(rows[1]["record"]) == GOOD[0] and rows[1]["source_file"] == files[1]
    assert rows[1]["id"] == "deep/b.jsonl.gz:1"  # the path below the input root

    store = OutputStore(job.output.path, job.source.storage)
    [record] = write_units(work_rows(files[0], 2), job.model_dump(mode="json"), "h" * 64
                           ).to_pylist()
    assert record["part"] == part_name(files[0], 0) and record["rows"] == 2
    store.write_manifest({"status": "test"})
    store.clear_tmp()
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix="io/out/")["Contents"]
    keys = {o["Key"] for o in listing if not o["Key"].endswith("/")}  # no directory markers
    assert keys == {f"io/out/{part_name(files[0], 0)}", "io/out/_manifest.json"}
    assert store.read_manifest() == {"status": "test"}
    assert set(store.committed()) == {part_name(files[0], 0)}
    bad_keys = pafs.S3FileSystem(access_key="AKIAWRONG", secret_key="wrong",
                                 endpoint_override=s3.endpoint, region=REGION)
    with pytest.raises(OSError):
        bad_keys.get_file_info(f"{BUCKET}/io/in/a.jsonl")


def test_config_from_object_storage(s3: SeaweedS3) -> None:
    body = b"source: {paths: s3://b/in}\noutput: {path: s3://b/out}\nsampling: {seed: 3}\n"
    s3.client().put_object(Bucket=BUCKET, Key="configs/job.yaml", Body=body)
    config = load_config(f"s3://{BUCKET}/configs/job.yaml", ["sampling.top_k=5"])
    assert config.sampling.seed == 3 and config.sampling.top_k == 5
