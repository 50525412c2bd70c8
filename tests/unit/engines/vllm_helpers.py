"""Helpers of the vLLM engine tests: environment, a GLM that stops often, random requests."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from pipeline.engines.base import VLLMOptions
from pipeline.glm.requests import SamplingParams, SpanRequest, SpanResult
from pipeline.glm.tokenization import GLMTokenizer, load_tokenizer
from tests.fixtures import DEMO_TOKENIZER, make_tiny_checkpoint

if TYPE_CHECKING:  # vLLM is imported when an engine is made: the checkpoint helpers need none
    from pipeline.engines.vllm.engine import VLLMEngine

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
    distributed state, and closing one tears it down under the others.

    `control` names a negative control patched into the model classes before the call (see
    `negative_control`): an engine is cached under it, so a patched engine is never handed out
    for an unpatched key or the other way round."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.engine: VLLMEngine | None = None

    def get(self, model_dir: Path, control: str = "", record_logits: bool = True,
            max_num_seqs: int = 4, **env: str) -> VLLMEngine:
        key = (str(model_dir), control, record_logits, max_num_seqs, tuple(sorted(env.items())))
        if key != self.key or self.engine is None:
            from pipeline.engines.vllm.engine import VLLMEngine

            self.close()
            with environment(**IN_PROCESS, **env):
                self.engine = VLLMEngine(model_dir, options=VLLMOptions(max_num_seqs=max_num_seqs),
                                         record_logits=record_logits)
            self.key = key
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine, self.key = None, None


NEGATIVE_CONTROLS = ("causal", "1d")


def negative_control(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Switch one part of the vLLM GLM off, in this process's model classes (the in-process
    engine core builds its model here, so an engine created afterwards runs the patched
    code): `causal` keeps vLLM's causal attention for prompts (no GLM prompt mask), `1d`
    zeroes the block-position embedding after loading (block positions ignored)."""
    from pipeline.engines.vllm import attention, model

    if name == "causal":  # no row is a context row: every segment causal
        monkeypatch.setattr(attention, "context_rows",
                            lambda block, starts: torch.zeros_like(starts[1:]))
    elif name == "1d":
        load_weights = model.GLMInfillForCausalLM.load_weights

        def load_without_block_positions(self, weights):
            loaded = load_weights(self, weights)
            with torch.no_grad():
                self.transformer.block_position_embeddings.weight.zero_()
            return loaded

        monkeypatch.setattr(model.GLMInfillForCausalLM, "load_weights",
                            load_without_block_positions)
    else:
        raise ValueError(f"unknown negative control {name!r}; one of {NEGATIVE_CONTROLS}")


def stopping_checkpoint(out_dir: Path, fmt: str = "safetensors", prefix: str = "",
                        shards: int = 1) -> Path:
    """A random GLM (head dim 64) whose `<|endofpiece|>` row is scaled up, so that answers
    end by stop as well as by length; weights of std 0.05 keep greedy picks clear of ties."""
    eop = load_tokenizer(DEMO_TOKENIZER).eop_id

    def scale_eop(state: dict[str, torch.Tensor]) -> None:
        state["word_embeddings.weight"][eop] *= 25

    return make_tiny_checkpoint(out_dir, seed=0, edit=scale_eop, initializer_range=0.05,
                                fmt=fmt, prefix=prefix, shards=shards)


def random_requests(tokenizer: GLMTokenizer, count: int, seed: int = 0) -> list[SpanRequest]:
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
        requests.append(SpanRequest(ids, [s + 1 for s in slots], params))
    return requests


def shared_start_requests(tokenizer: GLMTokenizer, count: int, shared: int = 160,
                          seed: int = 0) -> list[SpanRequest]:
    """Contexts of 190-250 ids whose first `shared` ids are the same, three masks each after
    them; 8 new tokens a blank, stop tokens ignored."""
    rng = random.Random(seed)
    start = [tokenizer.cls_id, *(rng.randrange(5, 1000) for _ in range(shared - 1))]
    requests = []
    for _ in range(count):
        tail = [rng.randrange(5, 1000) for _ in range(rng.randint(190, 249) - shared)]
        slots = sorted(rng.sample(range(len(tail)), 3))
        for slot in slots:
            tail[slot] = rng.choice(tokenizer.mask_token_ids)
        requests.append(SpanRequest([*start, *tail, tokenizer.eos_id],
                                    [shared + s for s in slots],
                                    SamplingParams(max_new_tokens=8, ignore_eos=True)))
    return requests


def with_params(requests: Sequence[SpanRequest], params: SamplingParams) -> list[SpanRequest]:
    """The same contexts and blanks, asked with other sampling settings."""
    return [SpanRequest(r.context_ids, r.blank_positions, params) for r in requests]


def logprob_error(expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> float:
    """Largest |Δ log-softmax| over the steps of one answer (logits rows of both engines)."""
    assert len(expected) == len(actual)
    return max((float((torch.log_softmax(e.double(), -1) - torch.log_softmax(a.double(), -1))
                      .abs().max()) for e, a in zip(expected, actual, strict=True)), default=0.0)


def first_step_error(expected: Sequence[SpanResult], actual: Sequence[SpanResult]) -> float:
    """Largest |Δ log-softmax| at the first step of every request's first blank: both engines
    saw the same prompt there, so it is comparable even where the answers differ later."""
    return max(logprob_error(want.step_logits[0][:1], got.step_logits[0][:1])
               for want, got in zip(expected, actual, strict=True))


def compare(expected: Sequence[SpanResult], actual: Sequence[SpanResult]) -> float:
    """Assert equal answers, stops and finish reasons; return the largest logprob error."""
    worst = 0.0
    for want, got in zip(expected, actual, strict=True):
        assert (got.spans, got.stop_ids, got.finish_reasons) == (
            want.spans, want.stop_ids, want.finish_reasons)
        for want_steps, got_steps in zip(want.step_logits, got.step_logits, strict=True):
            worst = max(worst, logprob_error(want_steps, got_steps))
    return worst
