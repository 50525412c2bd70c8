"""`glm-infill bench`: one JSON object with exact token counts, help, mistakes in one line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.cli.bench import _engines
from pipeline.glm.tokenization import load_tokenizer
from pipeline.glm.workload import SHAPES, Shape, fixed_length_texts, shape_config
from tests.fixtures import DEMO_TOKENIZER

pytestmark = pytest.mark.timeout(300)
FIGURES = ["engine", "elapsed_s", "output_tokens", "total_tokens", "output_tokens_per_s",
           "total_tokens_per_s"]


def bench(*args: str, model: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "--model", str(model),
                           *args], capture_output=True, text=True, timeout=280)


def measured(done: subprocess.CompletedProcess) -> dict:
    """The JSON object of a run that succeeded, and its one line for people."""
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    [summary] = done.stderr.splitlines()
    assert summary.startswith("glm-infill bench: ")
    return json.loads(line)


def usage_mistake(capsys: pytest.CaptureFixture, *args: str) -> str:
    """The one line that `glm-infill bench ARGS` ends with, exit status 2, nothing started."""
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *args])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert captured.out == "" and "Traceback" not in line
    return line


@pytest.mark.parametrize(("multi_mask", "context_tokens"), [
    ("iterative", 3 * (30 + 33)),  # the second round reads the first answer (4 ids) in place
    ("sequential", 3 * 30),        # of its mask; sequential reads the context once
])
def test_counts_are_exact(multi_mask: str, context_tokens: int, tiny_checkpoint: Path) -> None:
    report = measured(bench("--engine", "torch", "--baseline-engine", "torch", "--num-prompts",
                            "3", "--input-len", "30", "--output-len", "4", "--masks", "2",
                            "--multi-mask", multi_mask, "--max-batch-size", "2",
                            model=tiny_checkpoint))
    assert list(report) == ["engine", "model", "shape", "dtype", "num_prompts", "input_len",
                            "output_len", "masks", "multi_mask", *FIGURES[1:], "baseline",
                            "ratio"]
    assert report["model"] == str(tiny_checkpoint) and report["shape"] is None
    for figures in (report, report["baseline"]):
        assert figures["engine"] == "torch"
        assert figures["output_tokens"] == 3 * 2 * 4  # stop tokens ignored: fixed lengths
        assert figures["total_tokens"] == context_tokens + 3 * 2 * 4
    assert list(report["baseline"]) == FIGURES
    expected_ratio = report["output_tokens_per_s"] / report["baseline"]["output_tokens_per_s"]
    assert report["ratio"] == pytest.approx(expected_ratio)


def test_vllm_against_the_torch_baseline(tiny_checkpoint: Path) -> None:
    pytest.importorskip("vllm")
    report = measured(bench("--engine", "vllm", "--num-prompts", "4", "--input-len", "40",
                            "--output-len", "6", "--max-num-seqs", "4", "--kv-cache-gb", "0.25",
                            model=tiny_checkpoint))
    assert (report["engine"], report["baseline"]["engine"]) == ("vllm", "torch")
    assert report["output_tokens"] == report["baseline"]["output_tokens"] == 4 * 6
    assert report["total_tokens"] == report["baseline"]["total_tokens"] == 4 * (40 + 6)


def test_help_lists_the_workload_and_engine_options(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: glm-infill bench")
    for option in ("--shape", "--baseline-engine", "--input-len", "--output-len", "--masks",
                   "--max-num-seqs", "--max-batch-size", "glm-10b"):
        assert option in shown, option


def test_usage_mistakes_are_one_line(capsys: pytest.CaptureFixture, tiny_checkpoint: Path,
                                     tmp_path: Path) -> None:
    model = ["--model", str(tiny_checkpoint)]
    assert usage_mistake(capsys, "--input-len", "0") == (
        "glm-infill bench: error: argument --input-len: must be 1 or more, got 0")
    assert "unrecognized arguments: --inputlen" in usage_mistake(capsys, "--inputlen", "3")
    assert "not allowed with argument --model" in usage_mistake(capsys, *model, "--shape",
                                                                "glm-large")
    assert usage_mistake(capsys, *model, "--engine", "torch", "--input-len", "300") == (
        "glm-infill bench: error: --input-len 300 is more than the model's "
        "max_sequence_length 256")
    assert "cannot load model" in usage_mistake(capsys, "--model", str(tmp_path), "--engine",
                                                "torch")
    assert usage_mistake(capsys, *model, "--engine", "torch", "--max-num-seqs", "4") == (
        "glm-infill bench: error: --max-num-seqs only apply to --engine vllm")
    assert "at least 5 tokens" in usage_mistake(capsys, *model, "--engine", "torch",
                                                "--input-len", "4", "--masks", "3")


def test_vllm_asked_for_but_missing(capsys: pytest.CaptureFixture, tiny_checkpoint: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.cli.engine.vllm_installed", lambda: False)
    assert usage_mistake(capsys, "--model", str(tiny_checkpoint), "--engine", "vllm").startswith(
        "glm-infill bench: error: vLLM is not installed")


def test_prompts_the_model_cannot_fill_are_one_line(tiny_checkpoint: Path) -> None:
    done = bench("--engine", "torch", "--num-prompts", "2", "--input-len", "20",
                 "--output-len", "300", model=tiny_checkpoint)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "glm-infill bench: error: the prompts cannot be filled: too_long: text 1: "
        "max_new_tokens 300 exceeds the model's max_sequence_length 256 (block positions)"]


@pytest.mark.parametrize(("installed", "engine", "baseline", "expected"), [
    (True, None, None, ["vllm", "torch"]),
    (False, None, None, ["torch"]),
    (True, "torch", None, ["torch"]),
    (True, "vllm", "none", ["vllm"]),
    (False, "torch", "vllm", ["torch", "vllm"]),
])
def test_default_engines(installed: bool, engine: str | None, baseline: str | None,
                         expected: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM when installed, measured against torch; torch alone otherwise."""
    monkeypatch.setattr("pipeline.cli.bench.vllm_installed", lambda: installed)
    assert _engines(argparse.Namespace(engine=engine, baseline_engine=baseline)) == expected


# -- the workload ------------------------------------------------------------------------------

def test_prompts_are_exactly_input_len_with_blanks_spread() -> None:
    tokenizer = load_tokenizer(DEMO_TOKENIZER)
    texts = fixed_length_texts(tokenizer, 8, tokens=200, masks=3, seed=1)
    assert len(set(texts)) == 8 and texts == fixed_length_texts(tokenizer, 8, 200, 3, seed=1)
    for text in texts:
        ids = tokenizer.encode(text)
        assert len(ids) == len(tokenizer.encode_original(text)) == 200
        blanks = [i for i, token in enumerate(ids) if token in tokenizer.mask_names]
        assert len(blanks) == 3 and 20 < blanks[0] < blanks[1] < blanks[2] < 180


def test_shapes() -> None:
    assert shape_config(Shape.GLM_SMALL).num_layers == 12
    assert shape_config("glm-10b").hidden_size == 4096
    tokenizer_ids = len(load_tokenizer(DEMO_TOKENIZER))
    assert all(shape["vocab_size"] >= tokenizer_ids for shape in SHAPES.values())


def test_the_warm_up_is_a_text_of_its_own(small_model: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's prefix cache would hand the timed run a warmed-up prompt for free: the bench's
    warm-up is one more seeded text, filled first and not counted."""
    from pipeline.cli.bench import _texts
    from pipeline.engines.throughput import measure
    from pipeline.engines.torch_engine import TorchEngine
    from pipeline.glm.requests import MultiMask, SamplingParams

    args = argparse.Namespace(num_prompts=3, input_len=20, masks=1, seed=0)
    warm_up, *timed = _texts(args, small_model)
    assert len(timed) == 3 and warm_up not in timed
    engine = TorchEngine(small_model)
    real, calls = engine.generate, []

    def generate(requests):
        calls.append(len(requests))
        return real(requests)

    monkeypatch.setattr(engine, "generate", generate)
    run = measure(engine, timed, MultiMask.ITERATIVE, SamplingParams(max_new_tokens=2,
                                                                      ignore_eos=True),
                  warm_up=warm_up)
    assert calls == [1, 3]  # the warm-up alone, then the timed texts
    assert run.output_tokens == 3 * 2
