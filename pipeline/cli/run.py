"""`glm-infill run`: run (or resume) a pipeline job from a YAML config; also the entry point
of `python -m jobs.run_infill` under `ray job submit`."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.job.config import JobConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="job YAML, local or s3://, gs://, az:// "
                        "(default: the embedded demo job, jobs/default.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key, e.g. "
                        "--set sampling.max_new_tokens=8 (value parsed as YAML)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every unit (same as --set output.overwrite=true)")


def add_parser(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="run an infill job (default: the embedded demo job)",
                              description="Run an infill job.", allow_abbrev=False)
    run.set_defaults(handler=run_job)
    add_arguments(run)


def run_main(argv: list[str]) -> int:
    """`glm-infill run [CONFIG] [--set k=v ...] [--overwrite]` (exit codes: module doc); also
    the entry point of `python -m jobs.run_infill` under `ray job submit`."""
    parser = argparse.ArgumentParser(prog="glm-infill run", description="Run an infill job.",
                                     allow_abbrev=False)
    add_arguments(parser)
    return run_job(parser.parse_args(argv))


def show_examples(config: JobConfig, per_kind: int = 1) -> None:
    """A few answers of the demo model, one per mask kind, so that the README's first command
    shows what the job did and not only its figures."""
    from pipeline.job.runner import PREFIX
    from pipeline.job.storage import OutputStore

    store = OutputStore(config.output.path, config.source.storage)
    shown: dict[str, int] = {}
    for name in sorted(store.part_names()):
        table = store.read_part(name, ["id", "prompt", "fills", "exact_match"])
        for row in table.to_pylist():
            kind = row["fills"][0]["mask"] if row["fills"] else None
            if kind is None or shown.get(kind, 0) >= per_kind:
                continue
            shown[kind] = shown.get(kind, 0) + 1
            answers = " | ".join(fill["text"] for fill in row["fills"])
            verdict = {True: "exact", False: "not exact", None: "not scored"}[row["exact_match"]]
            print(f"{PREFIX} example {row['id']}: {row['prompt']}\n"
                  f"{PREFIX}   -> {answers}  ({verdict})", flush=True)


def run_job(args: argparse.Namespace) -> int:
    """Run the job; a human line on stderr for each failure, then (on every exit path) the
    machine-readable `[glm-infill] result {JSON}` line last on stdout: schedulers (Airflow,
    scripts around `ray job logs`) read the outcome from it."""
    from pipeline.job.config import ConfigError
    from pipeline.job.manifest import summary
    from pipeline.job.plan import SourceError
    from pipeline.job.result import JobResult, result_line
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
    job = None
    try:
        job = InfillJob.from_yaml(args.config or default_config_path(), overrides)
        result = job.run()
        if job.config.model.path is None:
            show_examples(job.config)
        for line in summary(result.manifest).splitlines():
            print(f"{PREFIX} {line}", flush=True)
    except (ConfigError, SourceError, OutputError, StorageError) as err:
        print(f"{PREFIX} error: {err}", file=sys.stderr)
        output = job.config.output.path if job else None
        result = getattr(err, "result", None) or JobResult("failed", 2, output, reason=str(err))
    except (JobFailed, InfrastructureError, JobInterrupted) as err:
        what = {JobFailed: "failed", JobInterrupted: "interrupted",
                InfrastructureError: "failed (infrastructure, nothing in flight was committed; "
                                     "run again to resume)"}[type(err)]
        print(f"{PREFIX} {what}: {err}", file=sys.stderr)
        result = err.result or JobResult("failed", err.exit_code, None, reason=str(err))
    print(result_line(result), flush=True)
    return result.exit_code
