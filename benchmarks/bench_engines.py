"""Torch engine vs vLLM engine on the same infill workload, in one run.

Random weights in the glm-small shape on the CPU, or glm-10b's shape in bfloat16 with
`--device cuda` (pipeline/glm/workload.py); a fixed seeded set of infill prompts (contexts of
64-400 tokens, 1-3 masks, greedy, up to --max-new-tokens per blank), timed as `glm-infill
bench` times them (pipeline/engines/throughput.py: torch in waves, vLLM a task per row). Prints
output tokens/s, total tokens/s (context tokens of every request + generated tokens, stop
tokens included: the same count for both engines) and the ratio. `glm-infill bench` measures
prompts of fixed lengths; this script, a mixed workload.

    python -m benchmarks.bench_engines [--num-prompts 200] [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch

from pipeline.engines import make_engine
from pipeline.engines.openmp import restart_with_intel_openmp
from pipeline.engines.throughput import measure, share_cores_with_vllm
from pipeline.glm.checkpoint import DType
from pipeline.glm.requests import MultiMask, SamplingParams
from pipeline.glm.workload import Shape, infill_texts, write_shape_checkpoint


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
    shape = Shape.GLM_10B if cuda else Shape.GLM_SMALL
    if not cuda:
        share_cores_with_vllm()
    kv_cache_gb = args.kv_cache_gb if args.kv_cache_gb is not None or cuda else 1

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_shape_checkpoint(Path(tmp), shape, dtype)
        params = SamplingParams(max_new_tokens=args.max_new_tokens)
        rows = []

        start = time.perf_counter()
        torch_engine = make_engine("torch", model_dir, dtype, args.device,
                                   {"max_batch_size": args.torch_batch_size})
        torch_start = time.perf_counter() - start
        # one text more, the warm-up, so that vLLM's prefix cache holds none of the timed ones
        warm_up, *texts = infill_texts(torch_engine.tokenizer, args.num_prompts + 1, seed=0,
                                       min_tokens=64, max_tokens=400, max_masks=3)
        lengths = [len(torch_engine.tokenizer.encode(t)) for t in texts]
        rows.append(measure(torch_engine, texts, args.multi_mask, params, warm_up))
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
            rows.append(measure(vllm_engine, texts, args.multi_mask, params, warm_up))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, {dtype}, "
          f"{shape} shape, random weights; {len(texts)} prompts, "
          f"context tokens {min(lengths)}-{max(lengths)} (mean "
          f"{sum(lengths) / len(lengths):.0f}), 1-3 masks, {args.multi_mask}, greedy, up to "
          f"{args.max_new_tokens} new tokens per blank; start-up torch {torch_start:.1f} s, "
          f"vllm {vllm_start:.1f} s (not timed below)")
    print(f"{'engine':>6} {'seconds':>8} {'out tokens':>10} {'out tok/s':>10} "
          f"{'total tok/s':>11} {'vs torch':>8}")
    for row in rows:
        print(f"{row.engine:>6} {row.elapsed_s:>8.1f} {row.output_tokens:>10} "
              f"{row.output_tokens_per_s:>10.1f} {row.total_tokens_per_s:>11.1f} "
              f"{row.output_tokens_per_s / rows[0].output_tokens_per_s:>7.2f}x")
    same = sum(a == b for a, b in zip(rows[0].fills, rows[1].fills, strict=True))
    print(f"rows with identical fills in both engines: {same}/{len(texts)}")


if __name__ == "__main__":
    restart_with_intel_openmp()  # the engines' OpenMP, as under `glm-infill bench`
    main()
