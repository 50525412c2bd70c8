"""`glm-infill` command line: `fill` answers blanks in texts, `run` runs a pipeline job.

`fill` is a stable contract other checks rely on: one JSON object per TEXT on stdout,
`{"text", "prompt_token_ids", "fills": [{"mask", "text", "token_ids", "finish_reason"}],
"output_text"}`. Bad input is reported on stderr and makes the exit status non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pipeline.checkpoint import CheckpointError
from pipeline.engines import ENGINES, make_engine
from pipeline.infill import MULTI_MASK_PROCEDURES, SamplingParams, run_procedures
from pipeline.tokenization import TokenizerError

VLLM_OPTIONS = ("max_num_seqs", "kv_cache_gb", "tensor_parallel_size",
                "gpu_memory_utilization", "max_model_len")


def _add_fill_parser(commands: argparse._SubParsersAction) -> None:
    fill = commands.add_parser("fill", help="fill the blanks of TEXT(s) and print JSON lines")
    fill.add_argument("texts", nargs="+", metavar="TEXT",
                      help="text with [MASK], [sMASK] or [gMASK] blanks")
    fill.add_argument("--model", help="GLM checkpoint directory (default: the demo checkpoint, "
                      "random weights, created on first use)")
    fill.add_argument("--engine", choices=ENGINES, default="torch")
    fill.add_argument("--multi-mask", choices=MULTI_MASK_PROCEDURES, default="iterative")
    fill.add_argument("--max-new-tokens", type=int, default=32, help="per blank")
    fill.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    fill.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    fill.add_argument("--top-p", type=float, default=1.0)
    fill.add_argument("--seed", type=int, default=None)
    fill.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    fill.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    vllm = fill.add_argument_group("vLLM engine options")
    vllm.add_argument("--max-num-seqs", type=int)
    vllm.add_argument("--kv-cache-gb", type=float, help="KV cache size (CPU)")
    vllm.add_argument("--tensor-parallel-size", type=int)
    vllm.add_argument("--gpu-memory-utilization", type=float)
    vllm.add_argument("--max-model-len", type=int)


def fill_main(args: argparse.Namespace) -> int:
    options = {name: getattr(args, name) for name in VLLM_OPTIONS
               if getattr(args, name) is not None}
    if options and args.engine != "vllm":
        raise SystemExit(f"glm-infill fill: {', '.join(options)} only apply to --engine vllm")
    try:
        params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                args.seed)
    except ValueError as err:
        raise SystemExit(f"glm-infill fill: {err}") from None
    model = args.model
    if model is None:
        from pipeline.demo import ensure_demo_checkpoint

        model = ensure_demo_checkpoint()
    try:
        engine = make_engine(args.engine, model, dtype=args.dtype, device=args.device, **options)
    except (CheckpointError, TokenizerError, OSError) as err:
        raise SystemExit(f"glm-infill fill: cannot load model: {err}") from None
    status = 0
    for result in run_procedures(engine, args.texts, args.multi_mask, params):
        if result.error_type:
            print(f"glm-infill fill: {result.error_type}: {result.error_message} "
                  f"(text: {result.text!r})", file=sys.stderr)
            status = 1
            continue
        print(json.dumps(result.to_json(), ensure_ascii=False), flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glm-infill", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_fill_parser(commands)
    run = commands.add_parser("run", help="run an infill job (default: the embedded demo job)",
                              add_help=False)
    run.add_argument("job_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "run":
        from pipeline.job import main_run

        return main_run(args.job_args)
    return fill_main(args)


if __name__ == "__main__":
    sys.exit(main())
