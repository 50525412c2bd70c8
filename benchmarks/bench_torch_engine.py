"""Torch engine speed on the CPU: prepacked oneDNN linear layers against F.linear, in one run.

Two parts, each variant measured in this process, alternating round by round (the best round
of each is printed: on a shared machine, rounds another process slowed are the outliers):

* GEMM GFLOP/s of every linear layer shape of glm-small (pipeline/glm/workload.py) for
  M = 1 and 16 rows (decoding at batch 1 and 16), 64, and 3200 (a prefill of 16 x 200 tokens):
  `F.linear` (MKL in float32) and oneDNN on a prepacked weight, float32 and bfloat16.
* The torch engine, greedy output tokens/s at each batch size, on prompts of exactly
  --input-len tokens with one blank answered --output-len tokens (stop tokens ignored, as in
  `glm-infill bench`; pipeline/engines/throughput.py times it): the engine as it loads (prepacked
  on a CPU) against the same engine with its model loaded as is (`F.linear`).

    python -m benchmarks.bench_torch_engine [--dtypes float32 bfloat16] [--batch-sizes 1 16 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pipeline.engines.openmp import restart_with_intel_openmp
from pipeline.engines.throughput import measure
from pipeline.engines.torch_engine import TorchEngine, prepacks
from pipeline.glm.checkpoint import DType
from pipeline.glm.modeling import GLMModel, linear, prepacked
from pipeline.glm.requests import MultiMask, SamplingParams
from pipeline.glm.workload import Shape, fixed_length_texts, shape_config, write_shape_checkpoint

GEMM_ROWS = (1, 16, 64, 3200)


def gemm_table(dtypes: list[DType], rounds: int) -> None:
    """GFLOP/s of F.linear and of oneDNN on a prepacked weight, per glm-small layer shape."""
    config = shape_config(Shape.GLM_SMALL)
    h = config.hidden_size
    layers = {"qkv": (h, 3 * h), "dense": (h, h), "h_to_4h": (h, 4 * h), "4h_to_h": (4 * h, h),
              "logits": (h, config.vocab_size)}
    print(f"GEMM GFLOP/s, glm-small layer shapes [M, K] x [K, N] (best of {rounds})")
    print(f"{'dtype':>8} {'layer':>8} {'M':>5} {'K':>5} {'N':>5} {'F.linear':>9} "
          f"{'prepacked':>9} {'ratio':>6}")
    for dtype in dtypes:
        torch_dtype = dtype.torch
        for rows in GEMM_ROWS:
            for name, (inputs, outputs) in layers.items():
                x = torch.randn(rows, inputs).to(torch_dtype)
                weight = (torch.randn(outputs, inputs) / inputs ** 0.5).to(torch_dtype)
                bias = torch.randn(outputs).to(torch_dtype)
                packed = prepacked(weight)
                plain, fast = best_rates(x, [weight, packed], bias, rounds)
                print(f"{dtype:>8} {name:>8} {rows:>5} {inputs:>5} {outputs:>5} {plain:>9.0f} "
                      f"{fast:>9.0f} {fast / plain:>5.2f}x")


def best_rates(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor,
               rounds: int) -> list[float]:
    """GFLOP/s of `linear` with each weight (dense: F.linear; prepacked: oneDNN), the best of
    `rounds` alternating rounds of ~0.1 s each."""
    flops = 2 * x.shape[0] * x.shape[1] * bias.shape[0]
    repeats = max(3, int(5e10 / flops / 10))
    best = [0.0] * len(weights)
    with torch.inference_mode():
        for weight in weights:
            linear(x, weight, bias)
        for _ in range(rounds):
            for i, weight in enumerate(weights):
                start = time.perf_counter()
                for _ in range(repeats):
                    linear(x, weight, bias)
                best[i] = max(best[i], flops * repeats / (time.perf_counter() - start) / 1e9)
    return best


def engine_table(dtypes: list[DType], batch_sizes: list[int], rounds: int, input_len: int,
                 output_len: int) -> None:
    """Output tokens/s of the engine prepacked and with F.linear, at every batch size."""
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    print(f"\ntorch engine, glm-small random weights, prompts of {input_len} tokens, 1 blank, "
          f"{output_len} tokens each, greedy; out tok/s (best of {rounds}); each batch size "
          f"on max(16, batch) prompts")
    print(f"{'dtype':>8} {'batch':>5} {'prompts':>7} {'F.linear':>9} {'prepacked':>9} "
          f"{'ratio':>6} {'vs batch 1':>10}")
    for dtype in dtypes:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = write_shape_checkpoint(Path(tmp), Shape.GLM_SMALL, dtype)
            fast = TorchEngine(model_dir, dtype=dtype, device="cpu")
            plain = TorchEngine(model_dir, dtype=dtype, device="cpu")
            plain.model = GLMModel.from_pretrained(model_dir, dtype.torch, "cpu")
            texts = fixed_length_texts(fast.tokenizer, max(16, *batch_sizes), input_len, 1)
            first = None
            for batch_size in batch_sizes:
                best = [0.0, 0.0]
                for _ in range(rounds):
                    for i, engine in enumerate((plain, fast)):
                        engine.max_batch_size = batch_size
                        run = measure(engine, texts[:max(16, batch_size)], MultiMask.ITERATIVE,
                                      params)
                        best[i] = max(best[i], run.output_tokens_per_s)
                first = first or best[1]
                print(f"{dtype:>8} {batch_size:>5} {max(16, batch_size):>7} {best[0]:>9.1f} "
                      f"{best[1]:>9.1f} {best[1] / best[0]:>5.2f}x {best[1] / first:>9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", nargs="+", type=DType, default=[DType.FLOAT32,
                                                                   DType.BFLOAT16],
                        choices=[DType.FLOAT32, DType.BFLOAT16])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--skip-gemm", action="store_true")
    args = parser.parse_args()
    dtypes = [d for d in args.dtypes if prepacks(torch.device("cpu"), d.torch)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; prepacked dtypes here: "
          f"{', '.join(dtypes) or 'none'}")
    if not args.skip_gemm:
        gemm_table(dtypes, args.rounds)
    engine_table(dtypes, args.batch_sizes, args.rounds, args.input_len, args.output_len)


if __name__ == "__main__":
    restart_with_intel_openmp()  # the engines' OpenMP, as under `glm-infill bench`
    main()
