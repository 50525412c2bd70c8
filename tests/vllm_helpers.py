"""Helpers of the vLLM engine tests: environment, a GLM that stops often, random requests."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from pipeline.checkpoint import GLMConfig, random_state_dict, save_checkpoint
from pipeline.infill import SamplingParams, SpanRequest, SpanResult
from pipeline.tokenization import GLMTokenizer, load_tokenizer
from pipeline.vllm_engine import VLLMEngine
from tests.fixtures import FIXTURE_MODEL, TOKENIZER_FILES

# in-process engine core (fast start) and a small CPU KV cache: 2 shared cores
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
# Same bound as the torch engine's step logits against the fixtures (test_conformance.py):
# float32 noise of differently ordered sums; a wrong attention pattern or position is > 1e-2.
TOLERANCE = 1e-4


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for a block (vLLM reads them when an engine starts)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class EngineSlot:
    """At most one in-process engine at a time: in-process engines share this process's
    distributed state, and closing one tears it down under the others."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.engine: VLLMEngine | None = None

    def get(self, model_dir: Path, **env: str) -> VLLMEngine:
        key = (str(model_dir), tuple(sorted(env.items())))
        if key != self.key or self.engine is None:
            self.close()
            with environment(**IN_PROCESS, **env):
                self.engine = VLLMEngine(model_dir, max_num_seqs=4)
            self.key = key
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine, self.key = None, None


def stopping_checkpoint(out_dir: Path, fmt: str = "safetensors", prefix: str = "",
                        shards: int = 1) -> Path:
    """A random GLM (head dim 64) whose `<|endofpiece|>` row is scaled up, so that answers
    end by stop as well as by length; weights of std 0.05 keep greedy picks clear of ties."""
    config = GLMConfig(num_layers=2, hidden_size=128, num_attention_heads=2,
                       max_sequence_length=256, vocab_size=1024, output_predict=True,
                       initializer_range=0.05)
    state = random_state_dict(config, seed=0)
    eop = load_tokenizer(FIXTURE_MODEL).eop_id
    state["word_embeddings.weight"][eop] *= 25
    save_checkpoint(state, config, out_dir, fmt, prefix, shards)
    for name in TOKENIZER_FILES:
        shutil.copy(FIXTURE_MODEL / name, out_dir / name)
    return out_dir


def random_requests(tokenizer: GLMTokenizer, count: int, seed: int = 0,
                    record_logits: bool = True) -> list[SpanRequest]:
    """Hub-layout contexts of 3-200 text ids with 1-4 masks of every kind, 1-10 new tokens."""
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        body = [rng.randrange(5, 1000) for _ in range(rng.randint(3, 200))]
        slots = sorted(rng.sample(range(len(body)), rng.randint(1, min(4, len(body)))))
        for slot in slots:
            body[slot] = rng.choice(tokenizer.mask_token_ids)
        ids = [tokenizer.cls_id, *body, tokenizer.eos_id]
        params = SamplingParams(max_new_tokens=rng.randint(1, 10))
        requests.append(SpanRequest(ids, [s + 1 for s in slots], params, record_logits))
    return requests


def logprob_error(expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> float:
    """Largest |Δ log-softmax| over the steps of one answer (logits rows of both engines)."""
    assert len(expected) == len(actual)
    return max((float((torch.log_softmax(e.double(), -1) - torch.log_softmax(a.double(), -1))
                      .abs().max()) for e, a in zip(expected, actual, strict=True)), default=0.0)


def compare(expected: Sequence[SpanResult], actual: Sequence[SpanResult]) -> float:
    """Assert equal answers, stops and finish reasons; return the largest logprob error."""
    worst = 0.0
    for want, got in zip(expected, actual, strict=True):
        assert (got.spans, got.stop_ids, got.finish_reasons) == (
            want.spans, want.stop_ids, want.finish_reasons)
        for want_steps, got_steps in zip(want.step_logits, got.step_logits, strict=True):
            worst = max(worst, logprob_error(want_steps, got_steps))
    return worst
