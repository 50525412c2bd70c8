"""The run report a real job writes beside its manifest, opened in headless Chromium, and
`glm-infill report` on object storage.

A small `span` job (targets known, so the quality figures appear once fills are scored) on the
session's Ray head fails its error threshold, writes its report anyway, and a resume that
passes rewrites it; the page loads every image with the network cut, and a screenshot is saved
in the test's tmp dir.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline.cli import main
from pipeline.job.runner import InfillJob, JobFailed
from pipeline.job.storage import MANIFEST, REPORT
from tests.browser import images_loaded, screenshot
from tests.e2e.ray_head import RayHead
from tests.e2e.s3 import BUCKET, SeaweedS3
from tests.unit.test_report import write_output

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NAMES = ("Mira", "Tolan", "Basu", "Keth", "Oren", "Pello")
BAD_LINES = [b"{broken", b'{"text": 7}', b'{"text": "one"}']  # invalid_json, wrong_type, too_short


def write_corpus(folder: Path) -> int:
    """Three JSONL files of plain sentences and bad lines; returns the number of rows."""
    folder.mkdir(parents=True)
    rows = 0
    for f, name in enumerate(NAMES[:3]):
        lines = [json.dumps({"text": f"{name} lives in {other} and has {n} cats. On day {n} "
                                     f"{name} walks to {other} with {n + 1} friends."}).encode()
                 for n, other in enumerate(NAMES)]
        lines += BAD_LINES[f:f + 1]
        (folder / f"f{f}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        rows += len(lines)
    return rows


def job(tmp_path: Path, model: Path, max_error_rate: float) -> InfillJob:
    return InfillJob.from_kwargs(
        source={"paths": str(tmp_path / "in"), "unit_bytes": 400},  # a few units per file
        output={"path": str(tmp_path / "out"), "max_error_rate": max_error_rate},
        model={"path": str(model)}, sampling={"max_new_tokens": 4},
        prompt={"policy": "span"}, resources={"batch_size": 4, "concurrency": 1})


def check_page(page: Path, manifest: dict, work: Path, charts: int) -> dict[str, int]:
    """The page says the run's status and errors, shows quality exactly when the manifest has
    it, and every one of its charts (`charts` without quality) loads in Chromium."""
    html = page.read_text()
    assert f'<span class="status {manifest["status"]}">' in html
    assert "invalid_json" in html and "wrong_type" in html and "too_short" in html
    scored = bool(manifest.get("quality"))
    assert ("Quality by mask kind" in html) == scored
    shown = images_loaded(page, work)
    assert shown["images"] == shown["loaded"] == charts + scored
    return shown


def test_every_run_writes_a_report_that_opens_in_chromium(ray_cluster: RayHead,
                                                          tiny_checkpoint: Path,
                                                          tmp_path: Path) -> None:
    rows = write_corpus(tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(JobFailed) as failure:  # 3 bad rows of 21: above 0.05, all committed
        job(tmp_path, tiny_checkpoint, 0.05).run()
    failed = tmp_path / "failed.html"  # the resume below rewrites the page
    failed.write_text((out / REPORT).read_text())
    # throughput, outcomes, lengths, finish reasons
    shown = check_page(failed, failure.value.result.manifest, tmp_path / "browser", charts=4)
    png = screenshot(failed, tmp_path / "report.png", shown["height"], tmp_path / "browser")
    print(f"report screenshot: {png}")

    resumed = job(tmp_path, tiny_checkpoint, 0.5).run()  # nothing to do: no commit times
    check_page(out / REPORT, resumed.manifest, tmp_path / "browser", charts=3)
    # the page beside the parts is skipped like the manifest by a reader of the output
    assert pads.dataset(out, format="parquet", exclude_invalid_files=False).count_rows() == rows


def test_report_command_on_object_storage(s3: SeaweedS3, tmp_path: Path) -> None:
    """Read and written through the storage layer: the page lands beside the manifest and
    nothing else is left behind (AWS_ENDPOINT_URL points the command at the server)."""
    store = write_output(f"s3://{BUCKET}/report/out", storage={"endpoint_url": s3.endpoint})
    assert main(["report", f"s3://{BUCKET}/report/out"]) == 0
    listing = s3.client().list_objects_v2(Bucket=BUCKET, Prefix="report/out/")["Contents"]
    names = {o["Key"].removeprefix("report/out/") for o in listing if not o["Key"].endswith("/")}
    assert names == {MANIFEST, REPORT, *store.part_names()}
    page = tmp_path / "page.html"
    page.write_bytes(s3.client().get_object(Bucket=BUCKET, Key=f"report/out/{REPORT}")["Body"]
                     .read())
    assert images_loaded(page, tmp_path / "browser")["loaded"] == 4
    assert main(["report", f"s3://{BUCKET}/report/nothing-here"]) == 2
