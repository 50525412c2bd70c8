"""`glm-infill report`: the run report of a job's output, one self-contained HTML page.

Every run writes it beside its manifest (`_report.html`); this command makes it again from the
output as it is now (a job still running, an older run), into the output or into `--out FILE`.
Exit 0 when written, 2 when OUTPUT_PATH is not a glm-infill output or `--out` cannot be
written, 3 when the storage could not be read or written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report", help="write the HTML run report of a job's output",
        description="Write the run report of a job's output: one HTML page (throughput, "
        "errors, lengths, finish reasons, quality, config) that needs no network to open.",
        allow_abbrev=False)
    report.set_defaults(handler=report_output)
    report.add_argument("output", metavar="OUTPUT_PATH",
                        help="the job's output.path: a local folder or s3://, gs://, az:// "
                        "(an S3-compatible store from AWS_ENDPOINT_URL)")
    report.add_argument("--out", metavar="FILE", type=Path,
                        help="write the page to this local file instead of "
                        "OUTPUT_PATH/_report.html")


class UnwritableOut(ValueError):
    """`--out` names a file that cannot be written (a usage mistake, exit 2)."""


def _save_local(page: str, path: Path) -> str:
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as err:
        raise UnwritableOut(f"--out {path}: cannot write it ({err.strerror or err})") from err
    return str(path.resolve())


def report_output(args: argparse.Namespace) -> int:
    """`glm-infill report OUTPUT_PATH [--out FILE]`."""
    from pipeline.job.runner import PREFIX
    from pipeline.job.storage import REPORT, OutputStore, StorageConfig, StorageError
    from pipeline.report import NotAnOutput, build_report

    try:
        store = OutputStore(args.output, StorageConfig())
        page = build_report(store)
        if args.out is None:
            store.write_report(page)
            where = f"{store.uri}/{REPORT}"
        else:
            where = _save_local(page, args.out)
    except (NotAnOutput, StorageError, UnwritableOut) as err:
        print(f"{PREFIX} error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # storage down, credentials refused
        print(f"{PREFIX} failed (infrastructure): {err}", file=sys.stderr)
        return 3
    print(f"{PREFIX} report written to {where}", flush=True)
    return 0
