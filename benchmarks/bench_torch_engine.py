"""Torch engine speed on the CPU: greedy output tokens/s at batch 1 and batch 16.

Random weights in the glm-small shape (pipeline/glm/workload.py), a fixed seeded prompt set,
every batch size run on the same prompts in this process and timed as `glm-infill bench` times
them (pipeline/engines/throughput.py); prints a table and the ratio to batch 1.

    python -m benchmarks.bench_torch_engine [--num-prompts 32] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from pipeline.engines.throughput import measure
from pipeline.engines.torch_engine import TorchEngine
from pipeline.glm.checkpoint import DType
from pipeline.glm.requests import MultiMask, SamplingParams
from pipeline.glm.workload import Shape, infill_texts, write_shape_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtype", default=DType.FLOAT32, type=DType, choices=list(DType))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_shape_checkpoint(Path(tmp), Shape.GLM_SMALL, args.dtype)
        engine = TorchEngine(model_dir, dtype=args.dtype, device=args.device)
        # every batch size runs on these weights: the batch size is read per `generate` call
        texts = infill_texts(engine.tokenizer, args.num_prompts, max_masks=1)
        params = SamplingParams(max_new_tokens=args.max_new_tokens)
        lengths = [len(engine.tokenizer.encode(t)) for t in texts]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, "
              f"{args.dtype}; {len(texts)} single-blank prompts, context tokens "
              f"{min(lengths)}-{max(lengths)} (mean {sum(lengths) / len(lengths):.0f}), "
              f"greedy, up to {args.max_new_tokens} new tokens")
        rows = []
        for batch_size in args.batch_sizes:
            engine.max_batch_size = batch_size
            rows.append((batch_size, measure(engine, texts, MultiMask.ITERATIVE, params)))
    base = rows[0][1].output_tokens_per_s
    print(f"{'batch':>5} {'seconds':>8} {'out tokens':>10} {'out tok/s':>10} {'vs first':>8}")
    for batch_size, row in rows:
        print(f"{batch_size:>5} {row.elapsed_s:>8.2f} {row.output_tokens:>10} "
              f"{row.output_tokens_per_s:>10.1f} {row.output_tokens_per_s / base:>7.2f}x")


if __name__ == "__main__":
    main()
