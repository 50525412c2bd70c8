"""`glm-infill` as a new user meets it: help everywhere, a version, no abbreviations, one
line and exit code 2 for a usage mistake (in a subprocess, from another directory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=100)


def test_help_and_version(tmp_path: Path) -> None:
    version = cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("glm-infill ")
    for args in (["--help"], ["run", "--help"], ["run", "-h"], ["fill", "--help"]):
        shown = cli(*args, cwd=tmp_path)
        assert shown.returncode == 0 and shown.stdout.startswith("usage: glm-infill"), args
    assert "--overwrite" in cli("run", "--help", cwd=tmp_path).stdout
    assert "--max-num-seqs" in cli("fill", "--help", cwd=tmp_path).stdout


def test_usage_mistakes_are_one_line_and_exit_2(tmp_path: Path) -> None:
    typo = cli("run", "--overwrit", cwd=tmp_path)  # no abbreviations: a typo is an error
    assert typo.returncode == 2 and "unrecognized arguments: --overwrit" in typo.stderr
    missing = cli("run", "--set", f"source.paths={tmp_path / 'nope'}", "--set",
                  f"output.path={tmp_path / 'out'}", cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    bad_key = cli("run", "--set", "sampling.temprature=1", cwd=tmp_path)
    assert bad_key.returncode == 2 and "sampling.temprature: unknown key" in bad_key.stderr
    for done in (typo, missing, bad_key):
        assert "Traceback" not in done.stderr
