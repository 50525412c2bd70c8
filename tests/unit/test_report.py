"""The run report on a small hand-written output folder (no Ray): what it counts, what the
page shows with and without quality figures, `glm-infill report`, and the page in Chromium."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

from pipeline.cli import main
from pipeline.job.config import JobConfig
from pipeline.job.manifest import RunManifest
from pipeline.job.runner import InfillJob, JobFailed, JobInterrupted
from pipeline.job.storage import MANIFEST, REPORT, OutputStore
from pipeline.report import build_report
from pipeline.report.data import collect, throughput
from schemas.output import OUTPUT_SCHEMA
from tests.browser import images_loaded, screenshot

STARTED = 1_000.0
QUALITY = {"[MASK]": {"blanks": 2, "exact": 1, "exact_match": 0.5, "token_f1": 0.75},
           "rows": {"scored": 2, "exact": 1, "exact_match": 0.5, "token_f1": 0.6}}


def fill(mask: str, tokens: int, reason: str) -> dict:
    return {"mask": mask, "text": "x", "token_ids": list(range(tokens)), "finish_reason": reason}


def row(index: int, prompt_tokens: int = 0, fills: list[dict] | None = None,
        error: str | None = None) -> dict:
    return {"id": f"a:{index}", "source_file": "/in/a.jsonl", "row_index": index,
            "prompt_tokens": prompt_tokens, "fills": fills,
            "output_tokens": sum(len(f["token_ids"]) for f in fills or []),
            "error_type": error, "error_message": error}


PARTS = [  # (rows, commit time after the start)
    ([row(0, 7, [fill("[MASK]", 2, "stop"), fill("[sMASK]", 3, "length")]),
      row(1, 9, [fill("[MASK]", 1, "stop")]), row(2, 9, [fill("[MASK]", 2, "stop")])], 4.0),
    ([row(3, error="no_mask"), row(4, error="no_mask"), row(5, error="too_long")], 10.0),
]


def write_output(out: Path | str, quality: dict | None = None,
                 storage: dict | None = None) -> OutputStore:
    """Two parts and the manifest a run that committed them would save (local, or object
    storage with `storage` the job's `source.storage`)."""
    config = JobConfig.model_validate({"source": {"paths": "x", "storage": storage or {}},
                                       "output": {"path": str(out)}})
    store = OutputStore(str(out), config.source.storage)
    run = RunManifest(config, store, ["/in/a.jsonl"], print)
    run.started = STARTED
    for unit, (rows, after) in enumerate(PARTS):
        name = f"part-{'0' * 16}-a-{unit:05d}.parquet"
        table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
        store.write_part(name, table)
        errors = [r["error_type"] for r in rows if r["error_type"]]
        run.add_part({"part": name, "source_file": "/in/a.jsonl", "unit": unit,
                      "rows": len(rows), "ok": len(rows) - len(errors), "error": len(errors),
                      "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
                      "output_tokens": sum(r["output_tokens"] for r in rows),
                      "error_types": {e: errors.count(e) for e in errors},
                      "committed_at": STARTED + after}, "committed")
    manifest = run.manifest("succeeded")
    manifest.pop("quality", None)  # whatever this version's manifest holds: the test says
    if quality is not None:
        manifest["quality"] = quality
    store.write_manifest(manifest)
    return store


def test_counts_come_from_every_batch_of_every_part(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.report.data.BATCH_ROWS", 2)  # parts span several batches
    data = collect(write_output(tmp_path / "out"))
    counts = data.counts
    assert counts.rows == 6 and data.parts_read == 2
    assert counts.outcomes == {"ok": 3, "no_mask": 2, "too_long": 1}
    assert counts.prompt_tokens == {7: 1, 9: 2}  # rows that were filled only
    assert counts.output_tokens == {5: 1, 1: 1, 2: 1}
    assert counts.answer_tokens == {("[MASK]", 2): 2, ("[MASK]", 1): 1, ("[sMASK]", 3): 1}
    assert counts.finish_reasons == {("[MASK]", "stop"): 3, ("[sMASK]", "length"): 1}


def test_throughput_bins_rows_and_tokens_by_commit_time() -> None:
    parts = {"p0": {"committed_at": STARTED + 4.0, "rows": 3, "output_tokens": 8},
             "p1": {"committed_at": STARTED + 10.0, "rows": 3, "output_tokens": 0},
             "old": {"committed_at": None, "rows": 50, "output_tokens": 50}}  # an earlier run
    series = throughput({"started_at": STARTED, "parts": parts})
    assert series.edges_s == [0.0, 5.0, 10.0]
    assert series.rows_per_s == [3 / 5, 3 / 5] and series.tokens_per_s == [8 / 5, 0.0]
    assert (series.commits_s, series.rows_done) == ([4.0, 10.0], [3, 6])
    assert throughput({"started_at": STARTED, "parts": {"old": parts["old"]}}) is None


def images(page: str) -> list[str]:
    return re.findall(r'<img alt="[^"]*" src="([^"]*)"', page)


def test_page_is_self_contained_and_shows_quality_only_when_scored(tmp_path: Path) -> None:
    plain = build_report(write_output(tmp_path / "plain"))
    scored = build_report(write_output(tmp_path / "scored", QUALITY))
    assert "Quality by mask kind" not in plain and "Quality by mask kind" in scored
    assert len(images(scored)) == len(images(plain)) + 1 == 5
    for page in (plain, scored):
        assert all(src.startswith("data:image/png;base64,") for src in images(page))
        assert "<script" not in page and "<link" not in page and "url(" not in page
        assert "no_mask" in page and "too_long" in page and "engine: torch" in page


def test_page_opens_in_chromium_with_every_image(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(build_report(write_output(tmp_path / "out", QUALITY)))
    shown = images_loaded(page, tmp_path / "browser")
    assert shown["images"] == shown["loaded"] == 5
    screenshot(page, tmp_path / "report.png", shown["height"], tmp_path / "browser")


def test_the_end_of_a_run_writes_the_report_and_never_fails_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Written after a failure too; not after an interruption; a report that cannot be made is
    one warning line."""
    store = write_output(tmp_path / "out")
    logged: list[str] = []
    job = InfillJob(JobConfig.model_validate({"source": {"paths": "x"},
                                              "output": {"path": str(tmp_path / "out")}}),
                    log=logged.append)
    run = SimpleNamespace(parts={"p": {}})
    with pytest.raises(JobFailed), job._report_at_end(store, run):
        raise JobFailed("error rate")
    assert (tmp_path / "out" / REPORT).is_file()

    def cannot(store: OutputStore) -> None:
        raise OSError("bucket gone")

    monkeypatch.setattr("pipeline.report.write_report", cannot)
    with pytest.raises(JobInterrupted), job._report_at_end(store, run):
        raise JobInterrupted("Ctrl-C")
    assert logged == []
    with job._report_at_end(store, run):
        pass
    assert logged == ["warning: the run report could not be written: bucket gone"]


def test_report_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as shown:
        main(["report", "--help"])
    assert shown.value.code == 0 and "OUTPUT_PATH" in capsys.readouterr().out
    out = tmp_path / "out"
    write_output(out)
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{out}/{REPORT}")
    assert (out / REPORT).read_text().startswith("<!DOCTYPE html>")
    assert not list(out.glob(f"{REPORT}.*")) and not list(out.glob("_tmp/*"))  # no temp left
    assert main(["report", str(out), "--out", str(tmp_path / "page.html")]) == 0
    assert (tmp_path / "page.html").is_file()


@pytest.mark.parametrize("case", ["missing", "no manifest", "not json", "bad --out"])
def test_report_command_mistakes_are_one_line_and_exit_2(case: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    if case != "missing":
        out.mkdir()
    if case == "not json":
        (out / MANIFEST).write_text("{not json")
    args = ["report", str(out)]
    if case == "bad --out":
        write_output(out)
        args += ["--out", str(tmp_path / "no-such-dir" / "page.html")]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1 and error.startswith("[glm-infill] error: ")
