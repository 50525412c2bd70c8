"""`glm-infill bench`: an engine's generation speed, like `vllm bench throughput`.

The model is `--model DIR` or a checkpoint of a named shape with seeded random weights, written
to a temporary directory (`pipeline/glm/workload.py`). The prompts are `--num-prompts` seeded
texts of exactly `--input-len` tokens with `--masks` blanks each, and every blank generates
exactly `--output-len` tokens (stop tokens ignored, like vLLM's `--ignore-eos`), greedy, so
every engine does the same work. Only generation is timed, after one prompt of warm-up
(`pipeline/engines/throughput.py`). A baseline engine runs the same prompts in the same run,
after the engine, and the ratio of their output tokens/s is printed.

Output: one JSON object on stdout, a line for people on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cli.engine import (
    add_engine_flags,
    given_engine_options,
    require_installed,
    start_engine,
    vllm_installed,
)
from pipeline.cli.flags import count_of_at_least, usage_error
from pipeline.engines.base import EngineName
from pipeline.glm.checkpoint import DType
from pipeline.glm.requests import MultiMask, SamplingParams
from pipeline.glm.workload import Shape

if TYPE_CHECKING:
    from pipeline.engines.throughput import Throughput
    from pipeline.glm.checkpoint import GLMConfig

NO_BASELINE = "none"
EPILOG = """Output: one JSON object on stdout: engine, model, shape, dtype, num_prompts,
input_len, output_len, masks, multi_mask, elapsed_s, output_tokens (exactly num_prompts x masks
x output_len), total_tokens (the context tokens of every request, an iterative row's later
rounds included, + output_tokens), output_tokens_per_s, total_tokens_per_s; with a baseline
also `baseline` (its engine and figures) and `ratio` (output tokens/s of the engine over the
baseline's). Exit status: 0 measured; 2 a usage mistake (a bad value, --input-len over the
model's max_sequence_length, prompts the model cannot fill, a --model that is not a GLM
checkpoint, vLLM not installed, settings an engine refused); 3 an engine the machine could not
start."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench", help="measure an engine's generation speed (output and total tokens/s)",
        description="Measure an engine's generation speed on seeded prompts of fixed lengths, "
        "with the ratio to a baseline engine measured in the same run.", epilog=EPILOG,
        allow_abbrev=False)
    bench.set_defaults(handler=main)
    model = bench.add_mutually_exclusive_group()
    model.add_argument("--model", metavar="DIR", help="GLM checkpoint directory (default: "
                       "random weights of --shape)")
    model.add_argument("--shape", choices=list(Shape), default=Shape.GLM_SMALL,
                       help="the dimensions of a random-weights checkpoint written to a "
                       "temporary directory (default: glm-small)")
    bench.add_argument("--engine", choices=list(EngineName),
                       help="the engine measured (default: vllm when installed, else torch)")
    bench.add_argument("--baseline-engine", choices=[*EngineName, NO_BASELINE],
                       help="measured on the same prompts in the same run (default: torch when "
                       "--engine is vllm, else none)")
    bench.add_argument("--dtype", choices=list(DType), default=DType.FLOAT32,
                       help="of the weights and the computation (default: float32)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    workload = bench.add_argument_group("workload")
    positive = count_of_at_least(1)
    workload.add_argument("--num-prompts", type=positive, default=16, metavar="N",
                          help="prompts, all in flight at once (default: 16)")
    workload.add_argument("--input-len", type=positive, default=200, metavar="TOKENS",
                          help="tokens of each prompt, blanks and [CLS] and end token included "
                          "(default: 200)")
    workload.add_argument("--output-len", type=positive, default=32, metavar="TOKENS",
                          help="tokens generated for each blank, stop tokens ignored "
                          "(default: 32)")
    workload.add_argument("--masks", type=positive, default=1, metavar="K",
                          help="blanks per prompt, [MASK] and [sMASK] spread over the text "
                          "(default: 1)")
    workload.add_argument("--multi-mask", choices=list(MultiMask), default=MultiMask.ITERATIVE,
                          help="how a prompt's blanks are filled (default: iterative)")
    workload.add_argument("--seed", type=int, default=0,
                          help="of the prompts and the random weights (default: 0)")
    add_engine_flags(bench)


def _engines(args: argparse.Namespace) -> list[EngineName]:
    """The engine measured, then the baseline if there is one."""
    default = EngineName.VLLM if vllm_installed() else EngineName.TORCH
    engine = EngineName(args.engine or default)
    baseline = args.baseline_engine or (EngineName.TORCH if engine is EngineName.VLLM
                                        else NO_BASELINE)
    return [engine] if baseline == NO_BASELINE else [engine, EngineName(baseline)]


def _model_config(args: argparse.Namespace) -> GLMConfig:
    """The config of `--model`, or of the shape, before any weights are written."""
    from pipeline.glm.checkpoint import CheckpointError, load_config
    from pipeline.glm.workload import shape_config

    if args.model is None:
        return shape_config(args.shape)
    try:
        return load_config(args.model)
    except CheckpointError as err:
        usage_error("bench", f"cannot load model: {err}")


def _texts(args: argparse.Namespace, model: Path) -> list[str]:
    """The warm-up text, then the timed ones: of the same lengths, none the warm-up (vLLM's
    prefix cache would hold it)."""
    from pipeline.glm.tokenization import TokenizerError, load_tokenizer
    from pipeline.glm.workload import fixed_length_texts

    try:
        return fixed_length_texts(load_tokenizer(model), args.num_prompts + 1, args.input_len,
                                  args.masks, args.seed)
    except TokenizerError as err:
        usage_error("bench", f"cannot load model: {err}")
    except ValueError as err:
        usage_error("bench", str(err))


def _on_cpu(device: str | None) -> bool:
    import torch

    return (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")


def _measure(args: argparse.Namespace, engine: EngineName, options: dict[str, Any],
             model: Path, texts: list[str]) -> Throughput:
    """Start the engine (not timed), time the prompts, close it."""
    from pipeline.engines.throughput import measure
    from pipeline.glm.requests import InfillError

    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    with start_engine("bench", engine, model, args.dtype, args.device, options,
                      args.debug) as running:
        try:
            return measure(running, texts[1:], args.multi_mask, params, warm_up=texts[0])
        except InfillError as err:
            usage_error("bench", f"the prompts cannot be filled: {err.error_type}: {err}")


def _report(args: argparse.Namespace, runs: list[Throughput]) -> dict[str, Any]:
    """The JSON object: the workload and the engine's figures, the baseline's and the ratio."""
    engine, *baseline = runs
    report = {"engine": engine.engine, "model": args.model,
              "shape": None if args.model else str(args.shape), "dtype": str(args.dtype),
              "num_prompts": args.num_prompts, "input_len": args.input_len,
              "output_len": args.output_len, "masks": args.masks,
              "multi_mask": str(args.multi_mask), **engine.to_json()}
    if baseline:
        report["baseline"] = baseline[0].to_json()
        report["ratio"] = engine.output_tokens_per_s / baseline[0].output_tokens_per_s
    return report


def _summary(report: dict[str, Any]) -> str:
    line = (f"glm-infill bench: {report['engine']} {report['output_tokens_per_s']:.1f} output "
            f"tok/s, {report['total_tokens_per_s']:.1f} total tok/s ({report['num_prompts']} "
            f"prompts in {report['elapsed_s']:.2f} s)")
    if "baseline" in report:
        baseline = report["baseline"]
        line += (f"; {baseline['engine']} {baseline['output_tokens_per_s']:.1f} output tok/s: "
                 f"{report['ratio']:.2f}x")
    return line


def main(args: argparse.Namespace) -> int:
    from pipeline.engines.throughput import share_cores_with_vllm
    from pipeline.glm.workload import write_shape_checkpoint

    engines = _engines(args)
    options = given_engine_options(args, "bench", engines)
    for engine in engines:
        require_installed("bench", engine)
    config = _model_config(args)
    if args.input_len > config.max_sequence_length:
        usage_error("bench", f"--input-len {args.input_len} is more than the model's "
                    f"max_sequence_length {config.max_sequence_length}")
    if _on_cpu(args.device):
        share_cores_with_vllm()
    with tempfile.TemporaryDirectory(prefix="glm-infill-bench-") as scratch:
        model = Path(args.model) if args.model else write_shape_checkpoint(
            Path(scratch), args.shape, args.dtype, args.seed)
        texts = _texts(args, model)
        runs = [_measure(args, engine, options[engine], model, texts) for engine in engines]
    report = _report(args, runs)
    print(json.dumps(report))
    print(_summary(report), file=sys.stderr)
    return 0
