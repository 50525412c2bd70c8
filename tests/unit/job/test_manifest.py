"""The manifest's totals and the progress report, from commit records (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.job.config import JobConfig
from pipeline.job.manifest import BYTES_PER_ROW, Progress, RowEstimate, RunManifest, summary
from pipeline.job.storage import MANIFEST, OutputStore


def record(part: str, rows: int, errors: dict[str, int], tokens: int = 5) -> dict:
    bad = sum(errors.values())
    return {"part": part, "source_file": "/in/a.jsonl", "unit": int(part[-1]), "rows": rows,
            "ok": rows - bad, "error": bad, "prompt_tokens": 10 * rows, "output_tokens": tokens,
            "error_types": errors, "damage": None, "node": "n1", "generated_by": ["n1:7"]}


def test_totals_error_types_and_the_saved_manifest(tmp_path: Path) -> None:
    config = JobConfig.model_validate({"source": {"paths": "x"},
                                       "output": {"path": str(tmp_path)}})
    store = OutputStore(str(tmp_path), config.source.storage)
    run = RunManifest(config, store, ["/in/a.jsonl"], print)
    run.add_part(record("p0", 4, {"no_mask": 1}), "skipped")
    run.add_part(record("p1", 6, {"no_mask": 1, "too_long": 2}, tokens=7), "committed")
    saved = run.save("failed", "1 input file(s) could not be read whole")
    assert json.loads((tmp_path / MANIFEST).read_text()) == saved
    assert (saved["rows_in"], saved["rows_ok"], saved["rows_error"]) == (10, 6, 4)
    assert saved["error_types"] == {"no_mask": 2, "too_long": 2}
    assert saved["this_run"]["rows"] == 6 and saved["output_tokens"] == 12
    assert saved["parts"]["p1"]["status"] == "committed"
    assert saved["parts"]["p0"]["status"] == "skipped"
    assert saved["parts"]["p1"]["generated_by"] == ["n1:7"]
    line = summary(saved)
    assert line.startswith("failed: 10 rows (6 ok, 4 errors") and "could not be read" in line
    assert saved["quality"] == {} and "\n" not in line  # nothing was scored

    progress = Progress(run, RowEstimate(24, 0, {}), interval_s=30, log=print)
    assert progress.bar(width=8) == "[##......]"
    assert progress.line().startswith("progress: 6/~24 rows (25%)")
    assert "ETA" in progress.line()


def test_quality_totals_come_from_every_parts_sums(tmp_path: Path) -> None:
    """Parts of an earlier run (`skipped`, sums recomputed from their files) and of this one
    add up alike; the summary gets one figure per mask kind that occurred."""
    config = JobConfig.model_validate({"source": {"paths": "x"},
                                       "output": {"path": str(tmp_path)}})
    run = RunManifest(config, OutputStore(str(tmp_path), config.source.storage), ["/in/a"], print)
    run.add_part({**record("p0", 2, {}), "quality": {
        "[MASK]": {"count": 3, "exact": 3, "f1_sum": 3.0},
        "rows": {"count": 2, "exact": 2, "f1_sum": 2.0}}}, "skipped")
    run.add_part({**record("p1", 2, {}), "quality": {
        "[MASK]": {"count": 1, "exact": 0, "f1_sum": 0.5},
        "[gMASK]": {"count": 1, "exact": 0, "f1_sum": 0.25},
        "rows": {"count": 2, "exact": 0, "f1_sum": 0.75}}}, "committed")
    saved = run.save("succeeded")
    assert saved["quality"] == {
        "[MASK]": {"blanks": 4, "exact": 3, "exact_match": 0.75, "token_f1": 0.875},
        "[gMASK]": {"blanks": 1, "exact": 0, "exact_match": 0.0, "token_f1": 0.25},
        "rows": {"scored": 4, "exact": 2, "exact_match": 0.5, "token_f1": 0.6875}}
    assert summary(saved).splitlines()[1] == (
        "quality: [MASK] 75.0% exact, F1 0.88 (4 blanks); [gMASK] 0.0% exact, F1 0.25 "
        "(1 blank); rows 50.0% exact, F1 0.69 (4 rows)")


def test_jsonl_rows_are_estimated_from_the_ranges_committed_so_far() -> None:
    """Until a JSONL byte range is committed its rows are a guess from a fixed bytes-per-row;
    then the bytes per row actually seen; Parquet rows stay exact."""
    estimate = RowEstimate(100, 10_000, {"r0": 2_000, "r1": 2_000})
    assert estimate.rows == 100 + round(10_000 / BYTES_PER_ROW)
    estimate.add("p-parquet", 50)  # not a JSONL range: no evidence about bytes per row
    assert estimate.rows == 100 + round(10_000 / BYTES_PER_ROW)
    estimate.add("r0", 40)  # 50 bytes a row
    assert estimate.rows == 100 + 200
    estimate.add("r1", 10)  # 4,000 bytes for 50 rows: 80 a row
    assert estimate.rows == 100 + 125
