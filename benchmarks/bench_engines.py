"""Torch engine vs vLLM engine on the same infill workload, in one run.

Random weights in the glm-small shape (shared/glm-fixtures/bench) on the CPU, or glm-10b's
shape in bfloat16 with `--device cuda`; a fixed seeded set of infill prompts (contexts of
64-400 tokens, 1-3 masks, greedy, up to --max-new-tokens per blank). The torch engine runs the
procedure in waves (`fill`); the vLLM engine runs every row as its own task (`afill`), so rows
and rounds overlap under continuous batching. Prints output tokens/s, total tokens/s (context
tokens of every request + generated tokens, stop tokens included: the same count for both
engines) and the ratio.

    python -m benchmarks.bench_engines [--num-prompts 200] [--device cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.workload import bench_checkpoint, infill_texts
from pipeline.engines import make_engine
from pipeline.engines.base import InfillEngine
from pipeline.glm.checkpoint import DType
from pipeline.glm.procedures import FillResult
from pipeline.glm.requests import MultiMask, SamplingParams, SpanRequest, SpanResult

GLM_10B = dict(num_layers=48, hidden_size=4096, num_attention_heads=64, max_sequence_length=1024,
               vocab_size=50048)


class Counted(InfillEngine):
    """An engine in front of another that counts the context and generated tokens of what it
    answers; `fill` and `afill` (the contract's) run through it unchanged."""

    def __init__(self, engine: InfillEngine):
        super().__init__()
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.config = engine.config
        self.context_tokens = 0
        self.output_tokens = 0

    def _count(self, request: SpanRequest, result: SpanResult) -> SpanResult:
        self.context_tokens += len(request.context_ids)
        self.output_tokens += sum(len(span) + (stop is not None)
                                  for span, stop in zip(result.spans, result.stop_ids,
                                                        strict=True))
        return result

    def check(self, request: SpanRequest) -> None:
        self.engine.check(request)

    def generate(self, requests: Sequence[SpanRequest]) -> list[SpanResult]:
        return [self._count(r, s) for r, s in zip(requests, self.engine.generate(requests),
                                                   strict=True)]

    async def agenerate(self, request: SpanRequest) -> SpanResult:
        return self._count(request, await self.engine.agenerate(request))

    def close(self) -> None:
        """The wrapped engine belongs to the caller."""


def run(engine: Counted, texts: list[str], multi_mask: MultiMask,
        params: SamplingParams) -> list[FillResult]:
    """Rows together in waves (`fill`), or each row its own task (`afill`) on an engine that
    batches continuously."""
    if not engine.engine.continuous_batching:
        return engine.fill(texts, multi_mask, params)

    async def fill_all() -> list[FillResult]:
        return list(await asyncio.gather(*(engine.afill(text, multi_mask, params)
                                           for text in texts)))

    return asyncio.run(fill_all())


def measure(engine: InfillEngine, texts: list[str], multi_mask: MultiMask,
            params: SamplingParams) -> dict:
    run(Counted(engine), texts[:2], multi_mask, params)  # warm-up
    counted = Counted(engine)
    start = time.perf_counter()
    results = run(counted, texts, multi_mask, params)
    seconds = time.perf_counter() - start
    errors = [r.error_message for r in results if r.error_type]
    assert not errors, errors[:3]
    total = counted.context_tokens + counted.output_tokens
    return {"engine": str(engine.name), "seconds": seconds, "output_tokens": counted.output_tokens,
            "total_tokens": total, "output_per_s": counted.output_tokens / seconds,
            "total_per_s": total / seconds, "fills": [[f.token_ids for f in r.fills]
                                                       for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--multi-mask", default=MultiMask.ITERATIVE, type=MultiMask,
                        choices=list(MultiMask))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, type=DType, choices=list(DType),
                        help="float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--torch-batch-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="vLLM concurrency (default 64 on cpu, 256 on cuda)")
    parser.add_argument("--kv-cache-gb", type=float, default=None,
                        help="vLLM KV cache (default 1 GiB on cpu; on cuda: memory utilization)")
    parser.add_argument("--attention-backend", default=None,
                        help="vLLM attention backend on cuda (recommended FLASH_ATTN)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dtype = args.dtype or (DType.BFLOAT16 if cuda else DType.FLOAT32)
    if not cuda:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM drops torch to one thread unless OMP_NUM_THREADS says otherwise: same cores
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    kv_cache_gb = args.kv_cache_gb if args.kv_cache_gb is not None or cuda else 1

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench_checkpoint(Path(tmp), dtype, **(GLM_10B if cuda else {}))
        params = SamplingParams(max_new_tokens=args.max_new_tokens)
        rows = []

        start = time.perf_counter()
        torch_engine = make_engine("torch", model_dir, dtype, args.device,
                                   {"max_batch_size": args.torch_batch_size})
        torch_start = time.perf_counter() - start
        texts = infill_texts(torch_engine.tokenizer, args.num_prompts, seed=0, min_tokens=64,
                             max_tokens=400, max_masks=3)
        lengths = [len(torch_engine.tokenizer.encode(t)) for t in texts]
        rows.append(measure(torch_engine, texts, args.multi_mask, params))
        torch_engine.close()
        del torch_engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

        start = time.perf_counter()
        vllm_engine = make_engine("vllm", model_dir, dtype, args.device, {
            "max_num_seqs": args.max_num_seqs or (256 if cuda else 64),
            "kv_cache_gb": kv_cache_gb, "attention_backend": args.attention_backend})
        vllm_start = time.perf_counter() - start
        with vllm_engine:
            rows.append(measure(vllm_engine, texts, args.multi_mask, params))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, {dtype}, "
          f"{'glm-10b' if cuda else 'glm-small'} shape, random weights; {len(texts)} prompts, "
          f"context tokens {min(lengths)}-{max(lengths)} (mean "
          f"{sum(lengths) / len(lengths):.0f}), 1-3 masks, {args.multi_mask}, greedy, up to "
          f"{args.max_new_tokens} new tokens per blank; start-up torch {torch_start:.1f} s, "
          f"vllm {vllm_start:.1f} s (not timed below)")
    print(f"{'engine':>6} {'seconds':>8} {'out tokens':>10} {'out tok/s':>10} "
          f"{'total tok/s':>11} {'vs torch':>8}")
    for row in rows:
        print(f"{row['engine']:>6} {row['seconds']:>8.1f} {row['output_tokens']:>10} "
              f"{row['output_per_s']:>10.1f} {row['total_per_s']:>11.1f} "
              f"{row['output_per_s'] / rows[0]['output_per_s']:>7.2f}x")
    same = sum(a == b for a, b in zip(rows[0]["fills"], rows[1]["fills"], strict=True))
    print(f"rows with identical fills in both engines: {same}/{len(texts)}")


if __name__ == "__main__":
    main()
