"""glm-infill: blank infilling with GLM models, from one text to a corpus on Ray.

Every command is a module of this package with `add_parser(commands)`:
* `fill` (fill.py) answers the blanks of texts, JSON lines on stdout (a stable contract);
* `run` (run.py) runs a pipeline job from a YAML config (default: the embedded demo job);
* `submit` (submit.py) sends that job to a Ray cluster's Jobs API and follows it;
* `validate` (validate.py) checks a job config without starting an engine;
* `report` (report.py) writes the HTML run report of a job's output;
* `bench` (bench.py) measures an engine's generation speed, like `vllm bench throughput`.

Exit codes (every command): 0 success; 1 the data did not pass (a `fill` text that cannot be
filled; a job above `output.max_error_rate`, or with an unreadable input file); 2 usage or
config error; 3 infrastructure failure (storage, network, an engine that died), after retries;
130 interrupted (Ctrl-C, SIGTERM); 141 the reader of the output went away
(`glm-infill fill ... | head`).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Sequence

from pipeline.cli import bench, fill, report, run, submit, validate
from pipeline.cli.flags import OneLineParser
from pipeline.cli.run import run_main
from pipeline.engines.openmp import restart_with_intel_openmp

__all__ = ["entry", "main", "run_main"]
BROKEN_PIPE_EXIT = 141  # what a shell reports for a command ended by SIGPIPE


# commands whose engine runs in this process: faster on Intel OpenMP (engines/openmp.py)
ENGINE_COMMANDS = ("fill", "bench")


def entry() -> int:
    """The `glm-infill` command: `main`, restarted first on Intel OpenMP for the commands
    that run an engine here."""
    if sys.argv[1:2] and sys.argv[1] in ENGINE_COMMANDS:
        restart_with_intel_openmp()
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="glm-infill", description=__doc__.split("\n")[0],
                           allow_abbrev=False)
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {importlib.metadata.version('glm-infill')}")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in (fill, run, submit, validate, report, bench):
        command.add_parser(commands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except BrokenPipeError:  # `glm-infill fill ... | head`: the reader left; not a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the final flush
        return BROKEN_PIPE_EXIT
