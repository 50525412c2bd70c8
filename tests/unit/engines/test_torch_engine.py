"""Torch engine behaviour beyond the fixtures: sampling, limits, bad input, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.engines.torch_engine import TorchEngine, choose_token, prepacks
from pipeline.glm.modeling import GLMModel, Linear, linear, prepacked
from pipeline.glm.requests import SamplingParams, SpanRequest
from tests.fixtures import FIXTURE_MODEL, case_logits, fixture_cases, spliced
from tests.unit.engines.vllm_helpers import random_requests, stopping_checkpoint, with_params

CASES = fixture_cases()
TEXTS = [c["text"] for c in CASES]


def fills(results) -> list[list[list[int]]]:
    return [[f.token_ids for f in r.fills] for r in results]


def test_seeded_sampling_reproduces(torch_engine) -> None:
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    first = torch_engine.fill(TEXTS, "iterative", params)
    again = torch_engine.fill(TEXTS, "iterative", params)
    assert fills(first) == fills(again)
    other_seed = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=8)
    assert fills(torch_engine.fill(TEXTS, "iterative", other_seed)) != fills(first)
    # a row's sample does not depend on the other rows of its batch
    assert fills(torch_engine.fill(TEXTS[1:2], "iterative", params)) == fills(first)[1:2]


def test_temperature_zero_and_top_k_one_are_greedy(torch_engine) -> None:
    greedy = fills(torch_engine.fill(TEXTS, "sequential", SamplingParams(max_new_tokens=12)))
    top1 = SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=3)
    assert fills(torch_engine.fill(TEXTS, "sequential", top1)) == greedy
    expected = [[[t for t in span if t not in (1000, 1007)] for span in c["orig_sequential"]
                 ["spans"]] for c in CASES]
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
    [result] = torch_engine.fill([TEXTS[1]], "sequential", SamplingParams(max_new_tokens=2))
    assert result.fills[0].token_ids == CASES[1]["orig_sequential"]["spans"][0][:2]
    for fill in result.fills:
        assert (fill.finish_reason, len(fill.token_ids)) in {("length", 2), ("stop", 0),
                                                             ("stop", 1)}
    assert result.fills[0].finish_reason == "length"


def test_ignore_eos_runs_every_span_to_max_new_tokens(tmp_path: Path) -> None:
    """A stop token is then an ordinary token: the answer goes on past it."""
    engine = TorchEngine(stopping_checkpoint(tmp_path))
    requests = random_requests(engine.tokenizer, 12, seed=3)
    stopped = engine.generate(with_params(requests, SamplingParams(max_new_tokens=12)))
    fixed = engine.generate(with_params(requests, SamplingParams(max_new_tokens=12,
                                                                 ignore_eos=True)))
    assert "stop" in {reason for result in stopped for reason in result.finish_reasons}
    for short, full in zip(stopped, fixed, strict=True):
        assert [len(span) for span in full.spans] == [12] * len(full.spans)
        assert set(full.finish_reasons) == {"length"} and set(full.stop_ids) == {None}
        stop = short.stop_ids[0]
        first = short.spans[0] + ([stop] if stop is not None else [])
        assert full.spans[0][:len(first)] == first  # the same answer, on past its stop


def test_bad_rows_get_errors_and_the_rest_are_filled(torch_engine) -> None:
    too_long = "word " * 200 + "[MASK]"
    results = torch_engine.fill(["no blank here", too_long, TEXTS[0]], "iterative",
                                SamplingParams(max_new_tokens=12))
    assert [r.error_type for r in results] == ["no_mask", "too_long", None]
    assert "max_sequence_length is 128" in results[1].error_message
    assert fills(results[2:]) == [[CASES[0]["hf_iterative"]["rounds"][0]["answer_ids"]]]
    [huge] = torch_engine.fill([TEXTS[0]], "iterative", SamplingParams(max_new_tokens=500))
    assert huge.error_type == "too_long" and "block positions" in huge.error_message


def test_invalid_sampling_parameters() -> None:
    for bad in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -2}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_engine_runs_bf16(tiny_checkpoint: Path) -> None:
    engine = TorchEngine(tiny_checkpoint, dtype="bfloat16")
    [result] = engine.generate([SpanRequest([1002, 5, 1003, 23, 1000], [2],
                                            SamplingParams(max_new_tokens=4))])
    assert engine.model.word_embeddings.weight.dtype == torch.bfloat16
    assert 1 <= len(result.spans[0]) + (result.stop_ids[0] is not None) <= 4


@pytest.mark.parametrize("rows", [1, 3, 64, 257])
def test_prepacked_linear_equals_f_linear(rows: int) -> None:
    """oneDNN on a prepacked weight is F.linear up to float32 summation order; in bfloat16,
    up to bfloat16 rounding of the output."""
    generator = torch.Generator().manual_seed(rows)
    for inputs, outputs in ((768, 2304), (3072, 768), (100, 37)):
        x = torch.randn(2, rows, inputs, generator=generator)
        weight = torch.randn(outputs, inputs, generator=generator) / inputs ** 0.5
        bias = torch.randn(outputs, generator=generator)
        torch.testing.assert_close(linear(x, prepacked(weight), bias), F.linear(x, weight, bias),
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            x, weight, bias = x.bfloat16(), weight.bfloat16(), bias.bfloat16()
            exact = F.linear(x.double(), weight.double(), bias.double())
            torch.testing.assert_close(linear(x, prepacked(weight), bias).double(), exact,
                                       rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("rows", [1, 16, 257])
def test_gelu_fused_into_the_prepacked_linear_is_bit_exact(rows: int) -> None:
    """float32: oneDNN's fused erf GELU gives the very values of GELU after the GEMM. In
    bfloat16 the fused GELU would see the unrounded sum (upstream rounds first), so there the
    GELU stays a step of its own: exactly F.gelu of the output."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 768, generator=generator)
    weight = torch.randn(3072, 768, generator=generator) / 768 ** 0.5
    bias = torch.randn(3072, generator=generator)
    for dtype in (torch.float32, torch.bfloat16):
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            continue
        packed = prepacked(weight.to(dtype))
        args = (x.to(dtype), packed, bias.to(dtype))
        assert torch.equal(linear(*args, gelu=True), F.gelu(linear(*args)))
    assert torch.equal(linear(x, weight, bias, gelu=True), F.gelu(F.linear(x, weight, bias)))


def test_engine_prepacks_on_cpu_and_the_model_still_trains(shared_fixtures: Path) -> None:
    """The engine's model runs prepacked; a model loaded as is keeps autograd (training)."""
    engine = TorchEngine(FIXTURE_MODEL, device="cpu")
    assert prepacks(torch.device("cpu"), torch.float32)
    assert not prepacks(torch.device("cpu"), torch.float16)
    assert not prepacks(torch.device("cuda"), torch.float32)
    linears = [m for m in engine.model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight.is_mkldnn for m in linears)
    assert engine.model.logits_weight is not None and engine.model.logits_weight.is_mkldnn

    model = GLMModel.from_pretrained(FIXTURE_MODEL).train()
    case = CASES[0]["hf_single"]
    n = len(case["input_ids"])
    logits = model(torch.tensor([case["input_ids"]]), torch.tensor([case["position_ids"]])
                   [:, :, :n], torch.tensor([case["generation_attention_mask"]])[:, :n, :n])
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_prepacked_full_forward_stays_near_the_fixtures(shared_fixtures: Path) -> None:
    """Prepacked, the fixture's full forwards move by float32 GEMM summation order only: well
    under the step-logit tolerance of the conformance tests (the fixture is itself 8.7e-5 from
    a float64 run); a wrong weight layout would be off by far more."""
    model = GLMModel.from_pretrained(FIXTURE_MODEL)
    model.prepack()
    for case in CASES:
        single = case["hf_single"]
        n = len(single["input_ids"])
        with torch.inference_mode():
            logits = model(torch.tensor([single["input_ids"]]),
                           torch.tensor([single["position_ids"]])[:, :, :n],
                           torch.tensor([single["generation_attention_mask"]])[:, :n, :n])[0]
        expected = torch.from_numpy(case_logits(case, "full_forward_logits"))
        assert float((logits - expected).abs().max()) < 5e-5


def test_batch_of_64_equals_one_by_one(tmp_path: Path) -> None:
    """Padding, finished rows kept in the batch, and compaction change no token, and logits
    only by float32 noise: 64 requests of 3-200 ids whose answers stop at different steps."""
    engine = TorchEngine(stopping_checkpoint(tmp_path), record_logits=True)
    requests = random_requests(engine.tokenizer, 64, seed=5)
    engine.max_batch_size = 64
    together = engine.generate(requests)
    engine.max_batch_size = 1
    alone = engine.generate(requests)
    assert len({sum(map(len, r.spans)) for r in together}) > 5  # rows finish at many steps
    for batched, single in zip(together, alone, strict=True):
        assert (batched.spans, batched.stop_ids, batched.finish_reasons) == (
            single.spans, single.stop_ids, single.finish_reasons)
        for steps, expected in zip(batched.step_logits, single.step_logits, strict=True):
            torch.testing.assert_close(torch.stack(steps), torch.stack(expected),
                                       rtol=1e-5, atol=1e-5)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_fill_contract(shared_fixtures: Path) -> None:
    case = CASES[1]
    done = run_cli("fill", "--model", str(FIXTURE_MODEL), "--max-new-tokens", "12",
                   "--multi-mask", "sequential", case["text"])
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    output = json.loads(line)
    assert list(output) == ["text", "prompt_token_ids", "fills", "output_text"]
    assert output["prompt_token_ids"] == case["orig_sequential"]["context_ids"]
    assert [list(f) for f in output["fills"]] == [["mask", "text", "token_ids",
                                                   "finish_reason"]] * 2
    assert output["output_text"] == spliced(case["text"], case["orig_sequential"]["span_texts"])


def test_cli_reports_bad_input_without_traceback(shared_fixtures: Path) -> None:
    done = run_cli("fill", "--model", str(FIXTURE_MODEL), "plain text", CASES[0]["text"])
    assert done.returncode == 1
    assert "no_mask: text has no mask token" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stdout.splitlines()) == 1
    missing = run_cli("fill", "--model", "/nonexistent", "a [MASK]")
    assert missing.returncode == 2 and "cannot load model" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_cli_flags_come_from_the_options_models(tiny_checkpoint: Path) -> None:
    """Sampling flags from SamplingParams, engine flags from the engine's options model."""
    done = run_cli("fill", "--model", str(tiny_checkpoint), "--max-new-tokens", "3",
                   "--max-batch-size", "2", "--temperature", "1.0", "--top-k", "5", "--seed",
                   "4", "a [MASK] b", "c [MASK] d [MASK]")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [len(r["fills"]) for r in rows] == [1, 2]
    assert all(len(f["token_ids"]) <= 3 for r in rows for f in r["fills"])
    other_engine = run_cli("fill", "--model", str(tiny_checkpoint), "--max-num-seqs", "4",
                           "a [MASK]")
    assert other_engine.returncode == 2
    assert "--max-num-seqs only apply to --engine vllm" in other_engine.stderr
    bad_sampling = run_cli("fill", "--model", str(tiny_checkpoint), "--top-p", "0", "a [MASK]")
    assert bad_sampling.returncode == 2 and "--top-p" in bad_sampling.stderr
    assert "Traceback" not in other_engine.stderr + bad_sampling.stderr
