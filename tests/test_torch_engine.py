"""Torch engine behaviour beyond the fixtures: sampling, limits, bad input, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.infill import SamplingParams, SpanRequest, run_procedures
from pipeline.torch_engine import TorchEngine, choose_token
from tests.fixtures import FIXTURE_MANIFEST, FIXTURE_MODEL

TEXTS = [c["text"] for c in FIXTURE_MANIFEST["cases"]]


def fills(results) -> list[list[list[int]]]:
    return [[f.token_ids for f in r.fills] for r in results]


def test_seeded_sampling_reproduces(torch_engine) -> None:
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    first = run_procedures(torch_engine, TEXTS, "iterative", params)
    again = run_procedures(torch_engine, TEXTS, "iterative", params)
    assert fills(first) == fills(again)
    other_seed = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=8)
    assert fills(run_procedures(torch_engine, TEXTS, "iterative", other_seed)) != fills(first)
    # a row's sample does not depend on the other rows of its batch
    assert fills(run_procedures(torch_engine, TEXTS[1:2], "iterative", params)) == fills(first)[1:2]


def test_temperature_zero_and_top_k_one_are_greedy(torch_engine) -> None:
    greedy = fills(run_procedures(torch_engine, TEXTS, "sequential", SamplingParams(12)))
    top1 = SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=3)
    assert fills(run_procedures(torch_engine, TEXTS, "sequential", top1)) == greedy
    expected = [[[t for t in span if t not in (1000, 1007)] for span in c["orig_sequential"]
                 ["spans"]] for c in FIXTURE_MANIFEST["cases"]]
    assert greedy == expected


def test_top_p_and_top_k_restrict_the_support() -> None:
    logits = torch.tensor([4.0, 3.0, 0.0, -1.0, -2.0])
    generator = torch.Generator().manual_seed(0)
    picks = {choose_token(logits, SamplingParams(temperature=1.0, top_k=2), generator)
             for _ in range(200)}
    assert picks == {0, 1}
    # softmax mass of token 0 is 0.71: top_p 0.5 keeps only it, 0.8 adds token 1
    assert {choose_token(logits, SamplingParams(temperature=1.0, top_p=0.5), generator)
            for _ in range(100)} == {0}
    assert {choose_token(logits, SamplingParams(temperature=1.0, top_p=0.8), generator)
            for _ in range(200)} == {0, 1}


def test_max_new_tokens_caps_each_blank(torch_engine) -> None:
    [result] = run_procedures(torch_engine, [TEXTS[1]], "sequential", SamplingParams(2))
    assert result.fills[0].token_ids == FIXTURE_MANIFEST["cases"][1]["orig_sequential"][
        "spans"][0][:2]
    for fill in result.fills:
        assert (fill.finish_reason, len(fill.token_ids)) in {("length", 2), ("stop", 0),
                                                             ("stop", 1)}
    assert result.fills[0].finish_reason == "length"


def test_bad_rows_get_errors_and_the_rest_are_filled(torch_engine) -> None:
    too_long = "word " * 200 + "[MASK]"
    results = run_procedures(torch_engine, ["no blank here", too_long, TEXTS[0]], "iterative",
                             SamplingParams(12))
    assert [r.error_type for r in results] == ["no_mask", "too_long", None]
    assert "max_sequence_length is 128" in results[1].error_message
    assert fills(results[2:]) == [[FIXTURE_MANIFEST["cases"][0]["hf_iterative"]["rounds"][0]
                                   ["answer_ids"]]]
    [huge] = run_procedures(torch_engine, [TEXTS[0]], "iterative", SamplingParams(500))
    assert huge.error_type == "too_long" and "block positions" in huge.error_message


def test_invalid_sampling_parameters() -> None:
    for bad in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -2}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_engine_runs_bf16(tiny_checkpoint: Path) -> None:
    engine = TorchEngine(tiny_checkpoint, dtype="bfloat16")
    [result] = engine.generate_spans([SpanRequest([1002, 5, 1003, 23, 1000], [2],
                                                  SamplingParams(4))])
    assert engine.model.word_embeddings.weight.dtype == torch.bfloat16
    assert 1 <= len(result.spans[0]) + (result.stop_ids[0] is not None) <= 4


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_fill_contract() -> None:
    case = FIXTURE_MANIFEST["cases"][1]
    done = run_cli("fill", "--model", str(FIXTURE_MODEL), "--max-new-tokens", "12",
                   "--multi-mask", "sequential", case["text"])
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    output = json.loads(line)
    assert list(output) == ["text", "prompt_token_ids", "fills", "output_text"]
    assert output["prompt_token_ids"] == case["orig_sequential"]["context_ids"]
    assert [list(f) for f in output["fills"]] == [["mask", "text", "token_ids",
                                                   "finish_reason"]] * 2
    assert output["output_text"] == case["orig_sequential"]["filled_text"]


def test_cli_reports_bad_input_without_traceback() -> None:
    done = run_cli("fill", "--model", str(FIXTURE_MODEL), "plain text", FIXTURE_MANIFEST[
        "cases"][0]["text"])
    assert done.returncode == 1
    assert "no_mask: text has no mask token" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stdout.splitlines()) == 1
    missing = run_cli("fill", "--model", "/nonexistent", "a [MASK]")
    assert missing.returncode != 0 and "cannot load model" in missing.stderr
    assert "Traceback" not in missing.stderr
