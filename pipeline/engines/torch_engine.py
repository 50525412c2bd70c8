"""The plain-PyTorch GLM engine: the CPU engine and the reference the vLLM engine is checked
against.

A batch of `SpanRequest`s is decoded together: one bidirectional pass over the padded
contexts fills the KV cache, then every step feeds one token per live row — the answer's last
token, or `<|startofpiece|>` at (next blank, 1) when a span has ended — so the prefix is never
recomputed. Padding and the gaps left by shorter rows are masked out per key slot; finished
rows leave the batch (a quarter at a time: compacting the cache copies it).

On a CPU the linear layers run on oneDNN with prepacked weights (`GLMModel.prepack`), in
float32 and, where the CPU has bf16 instructions, bfloat16.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.engines.base import EngineName, InfillEngine, TorchOptions
from pipeline.glm.checkpoint import DType
from pipeline.glm.modeling import GLMModel, KVCache
from pipeline.glm.requests import SamplingParams, SpanRequest, SpanResult
from pipeline.glm.tokenization import load_tokenizer


def choose_token(logits: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator | None) -> int:
    """Greedy (first maximum) at temperature 0; else temperature, top-k, top-p, then sample."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = torch.cumsum(probs, dim=-1) - probs > params.top_p  # keeps at least one
        logits[order[outside]] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


# Context tokens per prefill pass on a CPU: 64 contexts of 200 tokens filled 2 at a time take
# 0.65x the time of all 64 at once (glm-small; beyond ~800 tokens the scores and MLP
# activations of a pass outgrow the CPU's caches); the GEMMs are as fast from M = 64 up.
PREFILL_TOKENS = 512


def prepacks(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether linear layers run on prepacked oneDNN weights: on a CPU, in float32, or in
    bfloat16 where the CPU has bf16 instructions (AVX-512 BF16 / AMX); float16 and CUDA keep
    `F.linear`."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16
                                      and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class _Decoding:
    """One request's progress through its blanks: what to feed next, what was answered."""

    def __init__(self, request: SpanRequest, sop_id: int, stop_ids: set[int],
                 record_logits: bool):
        self.request = request
        self.sop_id = sop_id
        # ignore_eos: a stop token is an ordinary token, every span max_new_tokens long
        self.stop_ids = set() if request.params.ignore_eos else stop_ids
        self.record_logits = record_logits
        seed = request.params.seed if request.params.seed is not None else random.getrandbits(63)
        self.generator = None if request.params.greedy else torch.Generator().manual_seed(seed)
        self.result = SpanResult([], [], [], [] if record_logits else None)
        self._start_blank()

    def _start_blank(self) -> None:
        position = self.request.blank_positions[len(self.result.spans)]
        self.span: list[int] = []
        self.logits: list[torch.Tensor] = []
        self.position = position
        self.feed = (self.sop_id, position, 1)

    @property
    def done(self) -> bool:
        return len(self.result.spans) == len(self.request.blank_positions)

    def consume(self, logits: torch.Tensor) -> None:
        """Pick the next token from the logits of the last fed token and plan the next feed."""
        token = choose_token(logits, self.request.params, self.generator)
        if self.record_logits:
            self.logits.append(logits.clone())
        stop = token if token in self.stop_ids else None
        if stop is None:
            self.span.append(token)
        generated = len(self.span) + (stop is not None)
        if stop is None and generated < self.request.params.max_new_tokens:
            self.feed = (token, self.position, self.feed[2] + 1)
            return
        self.result.spans.append(self.span)
        self.result.finish_reasons.append("stop" if stop is not None else "length")
        self.result.stop_ids.append(stop)
        if self.result.step_logits is not None:
            self.result.step_logits.append(self.logits)
        if not self.done:
            self._start_blank()


class TorchEngine(InfillEngine):
    """GLM on PyTorch (CPU or CUDA, fp32/bf16), batched, with an incremental KV cache."""

    name = EngineName.TORCH

    def __init__(self, model_dir: str | Path, dtype: DType = DType.FLOAT32,
                 device: str | None = None, options: TorchOptions | None = None,
                 record_logits: bool = False):
        super().__init__()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = DType(dtype).torch
        self.model = GLMModel.from_pretrained(model_dir, self.dtype, self.device)
        if prepacks(self.device, self.dtype):
            self.model.prepack()
        self.config = self.model.config
        self.tokenizer = load_tokenizer(model_dir)
        self.max_batch_size = (options or TorchOptions()).max_batch_size
        self.record_logits = record_logits
        self.stop_ids = {self.tokenizer.eop_id, self.tokenizer.eos_id}

    def close(self) -> None:
        """Drop the weights (and the CUDA cache they held)."""
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def generate(self, requests: Sequence[SpanRequest]) -> list[SpanResult]:
        """Answer every request; similar context lengths are batched together. Raises the
        first bad request's InfillError before any is run (as the vLLM engine does)."""
        for request in requests:
            self.check(request)
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].context_ids))
        results: list[SpanResult | None] = [None] * len(requests)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start:start + self.max_batch_size]
            for i, result in zip(chunk, self._generate_batch([requests[i] for i in chunk]),
                                 strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, requests: list[SpanRequest]) -> list[SpanResult]:
        rows = [_Decoding(r, self.tokenizer.sop_id, self.stop_ids, self.record_logits)
                for r in requests]
        lengths = torch.tensor([len(r.context_ids) for r in requests], device=self.device)
        width = int(lengths.max())
        steps = max(len(r.blank_positions) * r.params.max_new_tokens for r in requests)
        cache = KVCache(self.config, len(rows), width + steps, self.dtype, self.device)

        ids = torch.full((len(rows), width), self.tokenizer.pad_id, device=self.device)
        for i, request in enumerate(requests):
            ids[i, :len(request.context_ids)] = torch.tensor(request.context_ids)
        positions = torch.stack([torch.arange(width, device=self.device),
                                 torch.zeros(width, dtype=torch.long, device=self.device)])
        valid_keys = torch.zeros(len(rows), width + steps, dtype=torch.bool, device=self.device)
        valid_keys[:, :width] = torch.arange(width, device=self.device) < lengths[:, None]
        context_mask = valid_keys[:, None, :width].expand(-1, width, -1)
        # on a CPU a few rows at a time, so that activations stay in the CPU's caches, each
        # part only as wide as its longest row (the rows come sorted by length; the slots
        # after it keep the cache's zeros, masked)
        chunk = len(rows) if self.device.type == "cuda" else max(1, PREFILL_TOKENS // width)
        for start in range(0, len(rows), chunk):
            part = slice(start, start + chunk)
            end = int(lengths[part].max())
            self.model(ids[part, :end], positions[:, :end].expand(len(ids[part]), -1, -1),
                       context_mask[part, :end, :end], cache.rows(part))
        cache.length = width

        batch = list(range(len(rows)))  # the rows in the cache, finished ones included
        while batch:
            feeds = torch.tensor([rows[i].feed for i in batch], device=self.device)
            slot = cache.length
            valid_keys[:, slot] = True
            logits = self.model(feeds[:, :1], feeds[:, 1:, None],
                                valid_keys[:, None, :slot + 1], cache)[:, -1].float()
            for j, i in enumerate(batch):
                if not rows[i].done:
                    rows[i].consume(logits[j])
            # finished rows leave once a quarter of the batch has finished: until then they
            # are fed their last token again, which costs less than copying the cache every
            # time a row finishes
            keep = [j for j, i in enumerate(batch) if not rows[i].done]
            if len(keep) <= len(batch) * 3 // 4:
                index = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.select(index)
                valid_keys = valid_keys[index]
                batch = [batch[j] for j in keep]
        return [row.result for row in rows]
