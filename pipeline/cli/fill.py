"""`glm-infill fill`: answer the blanks of texts (a stable contract other checks rely on).

One JSON object per TEXT on stdout, `{"text", "prompt_token_ids", "fills": [{"mask", "text",
"token_ids", "finish_reason"}], "output_text"}`; bad input is reported on stderr and makes the
exit status 1; usage mistakes exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

from pipeline.cli.flags import add_model_flags, flag, usage_error
from pipeline.engines.base import ENGINE_OPTIONS, EngineName
from pipeline.glm.checkpoint import DType
from pipeline.glm.requests import MultiMask, SamplingParams


def _usage_error(message: str) -> NoReturn:
    usage_error("fill", message)


def add_parser(commands: argparse._SubParsersAction) -> None:
    fill = commands.add_parser("fill", help="fill the blanks of TEXT(s) and print JSON lines",
                               description="Fill the blanks of TEXT(s); one JSON line each.",
                               allow_abbrev=False)
    fill.set_defaults(handler=main)
    fill.add_argument("texts", nargs="+", metavar="TEXT",
                      help="text with [MASK], [sMASK] or [gMASK] blanks")
    fill.add_argument("--model", help="GLM checkpoint directory (default: the demo checkpoint, "
                      "random weights, created on first use)")
    fill.add_argument("--engine", choices=list(EngineName), default=EngineName.TORCH)
    fill.add_argument("--multi-mask", choices=list(MultiMask), default=MultiMask.ITERATIVE)
    fill.add_argument("--dtype", choices=list(DType), default=DType.FLOAT32)
    fill.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    add_model_flags(fill, SamplingParams, "sampling")
    for engine, options in ENGINE_OPTIONS.items():
        add_model_flags(fill, options, f"{engine} engine options", defaults=False)


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line; options of another engine are a usage error."""
    chosen: dict[str, Any] = {}
    for engine, options in ENGINE_OPTIONS.items():
        given = {n: getattr(args, n) for n in options.model_fields if getattr(args, n) is not None}
        if engine == args.engine:
            chosen = given
        elif given:
            flags = ", ".join(flag(n) for n in given)
            _usage_error(f"{flags} only apply to --engine {engine}")
    return chosen


def main(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from pipeline.engines import make_engine
    from pipeline.glm.checkpoint import CheckpointError
    from pipeline.glm.tokenization import TokenizerError

    options = _engine_options(args)
    try:
        params = SamplingParams(**{n: getattr(args, n) for n in SamplingParams.model_fields})
    except ValidationError as err:
        problems = "; ".join(f"{flag(str(e['loc'][0]))}: {e['msg']}" for e in err.errors())
        _usage_error(problems)
    model = args.model
    if model is None:
        from pipeline.glm.demo import ensure_demo_checkpoint

        model = ensure_demo_checkpoint()
    try:
        engine = make_engine(args.engine, model, args.dtype, args.device, options)
    except (CheckpointError, TokenizerError, OSError) as err:
        _usage_error(f"cannot load model: {err}")
    status = 0
    per_text = [params.for_row("text", i) for i in range(len(args.texts))]
    with engine:
        for result in engine.fill(args.texts, args.multi_mask, per_text):
            if result.error_type:
                print(f"glm-infill fill: {result.error_type}: {result.error_message} "
                      f"(text: {result.text!r})", file=sys.stderr)
                status = 1
                continue
            print(json.dumps(result.to_json(), ensure_ascii=False), flush=True)
    return status
