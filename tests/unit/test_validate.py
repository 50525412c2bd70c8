"""`glm-infill validate` as a user runs it (a subprocess): the default job is valid and shows
its prompts; a config that would fail every row is one line on stderr and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "jobs" / "default.yaml"


def validate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=240)


def test_the_default_job_is_valid_and_shows_its_prompts() -> None:
    done = validate(cwd=ROOT)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "part-000.jsonl" in out and "part-001.jsonl.gz" in out  # the files, with units
    assert "columns of the first 115 lines of" in out and "id, lang, target, text" in out
    assert "max_sequence_length 256" in out and "tokenizer GLMChineseTokenizer" in out
    assert "prompts: the first 3 rows of" in out
    assert "  masked-0000: " in out and "tokens, fits" in out and "[MASK]" in out
    assert out.rstrip().endswith("valid: `glm-infill run` can start this job")
    assert "Traceback" not in done.stderr


def test_json_report_from_another_directory(tmp_path: Path) -> None:
    """Needs relative paths in a config file to resolve against the file's directory."""
    done = validate(str(DEFAULT), "--rows", "2", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["valid"] is True and report["problems"] == []
    assert [f["format"] for f in report["files"]] == ["jsonl", "jsonl, compressed"]
    assert report["model"]["config"]["max_sequence_length"] == report["prompt_budget"] == 256
    assert [p["id"] for p in report["prompts"]] == ["masked-0000", "masked-0001"]
    assert all(p["budget_action"] == "fits" for p in report["prompts"])


@pytest.mark.parametrize(("override", "message"), [
    ("sampling.max_new_tokens=1000000", "sampling.max_new_tokens: 1000000 exceeds the model's "
                                        "max_sequence_length 256"),
    ("source.keep_columns=[lang, region]", "source.keep_columns: 'region' not found in"),
    ("model.path=/nonexistent/glm", "model.path: /nonexistent/glm does not exist"),
])
def test_a_bad_config_is_one_line_and_exit_2(tmp_path: Path, override: str,
                                              message: str) -> None:
    done = validate("--set", f"source.paths={ROOT / 'data/sample/masked'}", "--set", override,
                    cwd=tmp_path)
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith(f"[glm-infill] error: {message}") and "Traceback" not in line
