"""`glm-infill`: every command of the project in one place.

* `fill` answers the blanks of texts. It is a stable contract other checks rely on: one JSON
  object per TEXT on stdout, `{"text", "prompt_token_ids", "fills": [{"mask", "text",
  "token_ids", "finish_reason"}], "output_text"}`; bad input is reported on stderr and makes
  the exit status non-zero.
* `run` runs a pipeline job from a YAML config (default: the embedded demo job).

Exit codes (both commands): 0 success; 1 the data did not pass (a `fill` text that cannot be
filled; a job above `output.max_error_rate`, or with an unreadable input file); 2 usage or
config error; 3 infrastructure failure (storage, network, an engine that died), after retries;
130 interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from pydantic import BaseModel

from pipeline.engines.base import ENGINE_OPTIONS, EngineName
from pipeline.glm.checkpoint import DType
from pipeline.glm.requests import MultiMask, SamplingParams


def _usage_error(message: str) -> NoReturn:
    """One line on stderr and exit status 2, never a traceback."""
    print(f"glm-infill fill: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel],
                     title: str | None = None, defaults: bool = True) -> None:
    """One flag per field of a pydantic model, with its type, default and description."""
    group = parser.add_argument_group(title) if title else parser
    for name, field in model.model_fields.items():
        kind = next((t for t in (int, float, str) if t in (field.annotation,
                     *getattr(field.annotation, "__args__", ()))), str)
        default = field.default if defaults else None  # None: tells "not given" apart
        help_text = field.description or ""
        if field.default is not None:
            help_text += f" (default: {field.default})"
        group.add_argument(_flag(name), dest=name, type=kind, default=default, help=help_text)


def _add_fill_parser(commands: argparse._SubParsersAction) -> None:
    fill = commands.add_parser("fill", help="fill the blanks of TEXT(s) and print JSON lines",
                               description="Fill the blanks of TEXT(s); one JSON line each.",
                               allow_abbrev=False)
    fill.add_argument("texts", nargs="+", metavar="TEXT",
                      help="text with [MASK], [sMASK] or [gMASK] blanks")
    fill.add_argument("--model", help="GLM checkpoint directory (default: the demo checkpoint, "
                      "random weights, created on first use)")
    fill.add_argument("--engine", choices=list(EngineName), default=EngineName.TORCH)
    fill.add_argument("--multi-mask", choices=list(MultiMask), default=MultiMask.ITERATIVE)
    fill.add_argument("--dtype", choices=list(DType), default=DType.FLOAT32)
    fill.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    _add_model_flags(fill, SamplingParams, "sampling")
    for engine, options in ENGINE_OPTIONS.items():
        _add_model_flags(fill, options, f"{engine} engine options", defaults=False)


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line; options of another engine are a usage error."""
    chosen: dict[str, Any] = {}
    for engine, options in ENGINE_OPTIONS.items():
        given = {n: getattr(args, n) for n in options.model_fields if getattr(args, n) is not None}
        if engine == args.engine:
            chosen = given
        elif given:
            flags = ", ".join(_flag(n) for n in given)
            _usage_error(f"{flags} only apply to --engine {engine}")
    return chosen


def fill_main(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from pipeline.engines import make_engine
    from pipeline.glm.checkpoint import CheckpointError
    from pipeline.glm.tokenization import TokenizerError

    options = _engine_options(args)
    try:
        params = SamplingParams(**{n: getattr(args, n) for n in SamplingParams.model_fields})
    except ValidationError as err:
        problems = "; ".join(f"{_flag(str(e['loc'][0]))}: {e['msg']}" for e in err.errors())
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


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="job YAML, local or s3://, gs://, az:// "
                        "(default: the embedded demo job, jobs/default.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key, e.g. "
                        "--set sampling.max_new_tokens=8 (value parsed as YAML)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every unit (same as --set output.overwrite=true)")


def run_main(argv: list[str]) -> int:
    """`glm-infill run [CONFIG] [--set k=v ...] [--overwrite]` (exit codes: module doc); also
    the entry point of `python -m jobs.run_infill` under `ray job submit`."""
    parser = argparse.ArgumentParser(prog="glm-infill run", description="Run an infill job.",
                                     allow_abbrev=False)
    _add_run_arguments(parser)
    return run_job(parser.parse_args(argv))


def run_job(args: argparse.Namespace) -> int:
    from pipeline.job.config import ConfigError
    from pipeline.job.manifest import summary
    from pipeline.job.plan import SourceError
    from pipeline.job.runner import (
        PREFIX,
        InfillJob,
        InfrastructureError,
        JobFailed,
        JobInterrupted,
        default_config_path,
    )
    from pipeline.job.storage import OutputError, StorageError

    overrides = args.overrides + (["output.overwrite=true"] if args.overwrite else [])
    try:
        job = InfillJob.from_yaml(args.config or default_config_path(), overrides)
        manifest = job.run()
    except (ConfigError, SourceError, OutputError, StorageError) as err:
        print(f"{PREFIX} error: {err}", file=sys.stderr)
        return 2
    except JobFailed as err:
        print(f"{PREFIX} failed: {err}", file=sys.stderr)
        return 1
    except InfrastructureError as err:
        print(f"{PREFIX} failed (infrastructure, nothing in flight was committed; run again to "
              f"resume): {err}", file=sys.stderr)
        return 3
    except JobInterrupted as err:
        print(f"{PREFIX} interrupted: {err}", file=sys.stderr)
        return 130
    print(f"{PREFIX} {summary(manifest)}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glm-infill", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('glm-infill')}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_fill_parser(commands)
    run = commands.add_parser("run", help="run an infill job (default: the embedded demo job)",
                              description="Run an infill job.", allow_abbrev=False)
    _add_run_arguments(run)
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_job(args)
    return fill_main(args)


if __name__ == "__main__":
    sys.exit(main())
