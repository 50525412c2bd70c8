"""`glm-infill validate`: check a job config against its data and model, without running it.

The checks `run` makes before it starts (pipeline/job/checks.py), and what the job would do:
its input files with their work units and rows, the model's shape and tokenizer, the token
budget, and the first rows of the first file turned into prompts by the prompt stage's own
code. No engine and no Ray actor start; Ray is joined only to look at a `model.path` that only
a remote cluster has. Exit 0 when the job can start, 2 with one line per problem on stderr
when it cannot, 3 when storage could not be read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.cli.flags import count_of_at_least
from pipeline.cli.run import add_arguments

if TYPE_CHECKING:
    from pipeline.job.checks import Columns, FileSummary, ModelSummary, SamplePrompt
    from pipeline.job.config import JobConfig

T = TypeVar("T")
DEFAULT_ROWS = 3


def add_parser(commands: argparse._SubParsersAction) -> None:
    validate = commands.add_parser(
        "validate", help="check a job config against its data and model, without running it",
        description="Check a job config against its data and model without starting engines. "
        "Takes the arguments of `run` (so a command line can be checked as it is; --overwrite "
        "changes nothing here, the output is not looked at).", allow_abbrev=False)
    validate.set_defaults(handler=validate_job)
    add_arguments(validate)
    validate.add_argument("--rows", type=count_of_at_least(0), default=DEFAULT_ROWS, metavar="N",
                          help="show the first N rows of the first file as prompts "
                          f"(default: {DEFAULT_ROWS})")
    validate.add_argument("--json", action="store_true",
                          help="print the report as one JSON object instead of text")


@dataclasses.dataclass
class Report:
    """What validate found; every problem is one line."""

    config_path: str
    config: JobConfig | None = None
    problems: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    files: list[FileSummary] = dataclasses.field(default_factory=list)
    columns: Columns | None = None
    model: ModelSummary | None = None
    prompt_budget: int | None = None
    prompts: list[SamplePrompt] = dataclasses.field(default_factory=list)

    def check(self, step: Callable[[], T]) -> T | None:
        """Run one step; a config problem it finds joins the report and later steps run on."""
        from pipeline.job.config import ConfigError
        from pipeline.job.plan import SourceError
        from pipeline.job.storage import StorageError

        try:
            return step()
        except (ConfigError, SourceError, StorageError) as err:
            self.problems += [line.strip() for line in str(err).splitlines()]
            return None

    def to_json(self) -> dict[str, Any]:
        config = self.config.model_dump(mode="json") if self.config else None
        return {"valid": not self.problems, **dataclasses.asdict(self), "config": config}


def _unreadable(files: list[FileSummary], config: JobConfig) -> list[str]:
    """Files the run would list as unreadable, failing the job unless they may be skipped."""
    if config.source.skip_unreadable_files:
        return []
    return [f"source.paths: {f.uri} cannot be read ({f.unreadable}); repair or remove it, or "
            "set source.skip_unreadable_files: true" for f in files if f.unreadable]


def _inspect_model(report: Report, config: JobConfig) -> None:
    from pipeline.job import checks

    report.model = report.check(lambda: checks.check_model(config, report.warnings.append))
    if report.model is not None:
        report.prompt_budget = checks.prompt_budget(
            config, report.model.config.max_sequence_length)


def _inspect_source(report: Report, config: JobConfig) -> list[str]:
    """The input files, listed and described, and the columns of the first one."""
    from pipeline.job import checks
    from pipeline.job.plan import list_files

    files = report.check(lambda: list_files(config.source)) or []
    report.files = [checks.describe_file(uri, config.source) for uri in files]
    report.problems += _unreadable(report.files, config)
    report.columns = checks.source_columns(files, config) if files else None
    if report.columns is not None:
        report.problems += report.check(
            lambda: checks.column_problems(config, report.columns)) or []
    return files


def _sample_prompts(report: Report, config: JobConfig, files: list[str], rows: int) -> None:
    from pipeline.job import checks

    if report.model is None or report.columns is None or not rows:
        return
    sample = checks.sample_rows(report.columns.uri, files, config, rows)
    report.prompts = checks.near_the_model(config, report.warnings.append,
                                           checks.build_sample_prompts, config, sample) or []


def build_report(args: argparse.Namespace) -> Report:
    from pipeline.job.runner import InfillJob, default_config_path

    path = str(args.config or default_config_path())
    report = Report(path)
    job = report.check(lambda: InfillJob.from_yaml(path, args.overrides))
    if job is not None:
        report.config = job.config
        _inspect_model(report, job.config)
        files = _inspect_source(report, job.config)
        _sample_prompts(report, job.config, files, args.rows)
    return report


# -- text output ----------------------------------------------------------------------------
def _size(count: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    index = 0
    while count >= 1024 and index < len(units) - 1:
        count, index = count / 1024, index + 1
    return f"{count:.0f} B" if index == 0 else f"{count:.1f} {units[index]}"


def _file_line(summary: FileSummary) -> str:
    if summary.unreadable:
        units, rows = "unreadable", ""
    else:
        units = "stream" if summary.units is None else (
            f"{summary.units} unit" + ("s" if summary.units != 1 else ""))
        rows = f"{'~' if summary.rows_estimated else ''}{summary.rows:,} rows"
    return f"  {summary.format:<18} {_size(summary.bytes):>10}  {units:<10} {rows:>13}  " \
           f"{summary.uri}"


def _source_lines(report: Report) -> list[str]:
    files = report.files
    rows = sum(f.rows or 0 for f in files)
    estimated = "~" if any(f.rows_estimated for f in files) else ""
    lines = [f"source: {len(files)} file(s), {estimated}{rows:,} rows",
             *map(_file_line, files)]
    if report.columns is not None:
        lines.append(f"columns of {report.columns.where}: {', '.join(report.columns.names)}")
    return lines


def _model_lines(model: ModelSummary, config: JobConfig, budget: int) -> list[str]:
    glm, weights = model.config, model.weights
    shapes = (f", {weights.tensors} tensors, {weights.parameters:,} parameters "
              f"({', '.join(weights.dtypes)})" if weights.tensors is not None
              else " (.bin: tensor shapes are checked when an engine loads them)")
    return [f"model: {model.name} at {model.path}",
            f"  GLM {glm.num_layers} layers, hidden {glm.hidden_size}, "
            f"{glm.num_attention_heads} heads, max_sequence_length {glm.max_sequence_length}, "
            f"vocab_size {glm.vocab_size}",
            f"  tokenizer {model.tokenizer} ({model.tokenizer_size} tokens)",
            f"  weights {', '.join(weights.files)}: {_size(weights.bytes)}{shapes}",
            f"budget: prompts up to {budget} tokens (prompt.budget.on_overflow "
            f"{config.prompt.budget.on_overflow}), answers up to "
            f"{config.sampling.max_new_tokens} tokens per blank ({config.sampling.multi_mask})"]


def _prompt_lines(report: Report, config: JobConfig) -> list[str]:
    lines = [f"prompts: the first {len(report.prompts)} rows of "
             f"{report.columns.uri if report.columns else ''}, policy {config.prompt.policy}"]
    for sample in report.prompts:
        if sample.error_type:
            lines.append(f"  {sample.id}: error {sample.error_type}: {sample.error_message}")
            continue
        lines += [f"  {sample.id}: {sample.prompt_tokens} tokens, {sample.budget_action}",
                  f"    {sample.prompt}"]
        if sample.target is not None:
            lines.append(f"    target: {json.dumps(sample.target, ensure_ascii=False)}")
    return lines


def print_report(report: Report) -> None:
    config = report.config
    lines = [f"config: {report.config_path}"]
    if config is not None:
        lines += _source_lines(report)
        if report.model is not None and report.prompt_budget is not None:
            lines += _model_lines(report.model, config, report.prompt_budget)
        if report.prompts:
            lines += _prompt_lines(report, config)
    print("\n".join(lines), flush=True)


def validate_job(args: argparse.Namespace) -> int:
    """`glm-infill validate [CONFIG] [--set k=v ...] [--rows N] [--json]`."""
    from pipeline.job.runner import PREFIX

    try:
        report = build_report(args)
    except OSError as err:  # storage down after the retries
        print(f"{PREFIX} failed (infrastructure; nothing was checked past it): {err}",
              file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(report.to_json()), flush=True)
    else:
        print_report(report)
    for warning in report.warnings:
        print(f"{PREFIX} {warning}", file=sys.stderr)
    for problem in report.problems:
        print(f"{PREFIX} error: {problem}", file=sys.stderr)
    if not report.problems and not args.json:
        print(f"{PREFIX} valid: `glm-infill run` can start this job", flush=True)
    return 2 if report.problems else 0
