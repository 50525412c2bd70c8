"""`glm-infill fill`: answer the blanks of texts (a stable contract other checks rely on).

Texts come from the TEXT arguments, from standard input (`-` as the only TEXT) or from a file
(`--input-file`): one text per line, or JSON Lines with the text in `--text-field`. They are
read, filled and printed `BATCH_SIZE` at a time, so input of any length runs in bounded memory;
text i (counted from 0 over the whole input) samples with its own seed `for_row("text", i)`, so
results never depend on the batching.

Output: one JSON object per filled text on stdout, `{"text", "prompt_token_ids", "fills":
[{"mask", "text", "token_ids", "finish_reason"}], "output_text"}`, or with `--output-format
text` one line per text, its `output_text`. A text that cannot be filled is reported on stderr
and makes the exit status 1; usage mistakes and settings an engine refuses exit 2, an engine the
machine could not start 3, each with one line.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import itertools
import json
import sys
from collections.abc import Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

from pipeline.cli.engine import (
    add_engine_flags,
    given_engine_options,
    require_installed,
    start_engine,
)
from pipeline.cli.flags import add_model_flags, flag, usage_error
from pipeline.engines.base import EngineName
from pipeline.glm.checkpoint import DType
from pipeline.glm.requests import InfillError, MultiMask, SamplingParams, SamplingSettings
from schemas.errors import ErrorType

if TYPE_CHECKING:
    from pipeline.engines.base import InfillEngine
    from pipeline.glm.procedures import FillResult

BATCH_SIZE = 64  # texts read, filled and printed together
STDIN = "-"
JSONL_SUFFIXES = (".jsonl", ".json")
LINE_BREAKS = str.maketrans({"\n": "\\n", "\r": "\\r"})  # --output-format text: one line each

EPILOG = """Exit status: 0 every text filled; 1 a text could not be filled (reported on stderr:
"text N: error_type: message", N counting TEXT arguments or input lines from 1); 2 a usage
mistake, a directory that is not a GLM checkpoint, or settings the engine refused (an option
value, a dtype, a KV cache larger than the memory); 3 an engine that the machine could not
start. Failures are one line; --debug shows vLLM's logs and the traceback."""

Text = str | InfillError  # an input text, or why its line holds none


class InputFormat(StrEnum):
    TEXT = "text"
    JSONL = "jsonl"


class OutputFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


def _usage_error(message: str) -> NoReturn:
    usage_error("fill", message)


def add_parser(commands: argparse._SubParsersAction) -> None:
    fill = commands.add_parser("fill", help="fill the blanks of texts and print JSON lines",
                               description="Fill the blanks of texts; one JSON line each.",
                               epilog=EPILOG, allow_abbrev=False)
    fill.set_defaults(handler=main)
    fill.add_argument("texts", nargs="*", metavar="TEXT",
                      help="text with [MASK], [sMASK] or [gMASK] blanks; `-` as the only TEXT "
                      "reads the texts from standard input")
    fill.add_argument("--model", help="GLM checkpoint directory (default: the demo checkpoint, "
                      "random weights, created on first use)")
    fill.add_argument("--engine", choices=list(EngineName), default=EngineName.TORCH)
    fill.add_argument("--multi-mask", choices=list(MultiMask), default=MultiMask.ITERATIVE)
    fill.add_argument("--dtype", choices=list(DType), default=DType.FLOAT32)
    fill.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    files = fill.add_argument_group("input and output")
    files.add_argument("--input-file", metavar="PATH", help="read the texts from PATH, one a "
                       "line, instead of TEXT arguments")
    files.add_argument("--input-format", choices=list(InputFormat),
                       help="of --input-file or `-`: a text per line, or JSON Lines (default: "
                       f"jsonl for a file named *{', *'.join(JSONL_SUFFIXES)}, text otherwise)")
    files.add_argument("--text-field", help="the JSON Lines field that holds the text "
                       "(default: text)")
    files.add_argument("--output-format", choices=list(OutputFormat), default=OutputFormat.JSON,
                       help="json: a JSON line per filled text; text: a line per text, the "
                       "filled text (line breaks written as \\n and \\r; empty for a text that "
                       "failed) (default: json)")
    add_model_flags(fill, SamplingSettings, "sampling")
    add_engine_flags(fill)


def _input_format(args: argparse.Namespace) -> InputFormat:
    if args.input_format:
        return InputFormat(args.input_format)
    jsonl = args.input_file and Path(args.input_file).suffix.lower() in JSONL_SUFFIXES
    return InputFormat.JSONL if jsonl else InputFormat.TEXT


def _check_input(args: argparse.Namespace) -> None:
    """Usage mistakes in where the texts come from: they exit now, before an engine starts."""
    if args.texts and args.input_file:
        _usage_error("give TEXT arguments or --input-file, not both")
    if STDIN in args.texts and args.texts != [STDIN]:
        _usage_error(f"`{STDIN}` (standard input) must be the only TEXT")
    if not args.texts and not args.input_file:
        _usage_error(f"no texts: give TEXT arguments, `{STDIN}` for standard input, or "
                     "--input-file PATH")
    if args.texts not in ([], [STDIN]) and (args.input_format or args.text_field):
        _usage_error(f"--input-format and --text-field apply to --input-file and `{STDIN}`")
    if args.text_field and _input_format(args) is not InputFormat.JSONL:
        _usage_error("--text-field applies to JSON Lines input (--input-format jsonl)")


def _open_input(args: argparse.Namespace) -> BinaryIO | None:
    """The stream the texts are read from; None: the TEXT arguments."""
    _check_input(args)
    if args.input_file:
        try:
            return open(args.input_file, "rb")  # noqa: SIM115 (main closes it)
        except OSError as err:
            _usage_error(f"--input-file: {err.strerror}: {args.input_file}")
    return sys.stdin.buffer if args.texts == [STDIN] else None


def _lines(stream: BinaryIO) -> Iterator[bytes]:
    """The stream's lines without their line ends (nor a UTF-8 byte order mark)."""
    for number, line in enumerate(stream):
        if number == 0:
            line = line.removeprefix(codecs.BOM_UTF8)
        yield line.removesuffix(b"\n").removesuffix(b"\r")


def _decoded(line: bytes) -> Text:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        return InfillError(ErrorType.INVALID_UTF8, f"the line is not UTF-8: {err}")


def _json_text(line: bytes, field: str) -> Text:
    from pipeline.job.rows import parse_json_record, require_text

    try:
        return require_text(parse_json_record(line), field)
    except InfillError as err:
        return err


def _texts(args: argparse.Namespace, stream: BinaryIO | None) -> Iterator[Text]:
    if stream is None:
        return iter(args.texts)
    if _input_format(args) is InputFormat.JSONL:
        field = args.text_field or "text"
        return (_json_text(line, field) for line in _lines(stream))
    return (_decoded(line) for line in _lines(stream))


def _batches(texts: Iterable[Text]) -> Iterator[list[tuple[int, Text]]]:
    """(global index, text) pairs, `BATCH_SIZE` at a time."""
    numbered = enumerate(texts)
    while batch := list(itertools.islice(numbered, BATCH_SIZE)):
        yield batch


def _fill(engine: InfillEngine, batch: list[tuple[int, Text]], multi_mask: MultiMask,
          params: SamplingParams) -> list[FillResult | InfillError]:
    """The batch's outcomes in input order; each text samples with the seed of its index."""
    todo = [(i, text) for i, text in batch if isinstance(text, str)]
    filled = iter(engine.fill([text for _, text in todo], multi_mask,
                              [params.for_row("text", i) for i, _ in todo]))
    return [text if isinstance(text, InfillError) else next(filled) for _, text in batch]


def _report(number: int, outcome: FillResult | InfillError, output_format: OutputFormat) -> bool:
    """Print one text's outcome: the result on stdout, a failure on stderr. False: it failed."""
    if isinstance(outcome, InfillError):
        problem = f"{outcome.error_type}: {outcome}"
    elif outcome.error_type:
        problem = f"{outcome.error_type}: {outcome.error_message} (text: {outcome.text!r})"
    elif output_format is OutputFormat.TEXT:
        print(outcome.output_text.translate(LINE_BREAKS))
        return True
    else:
        print(json.dumps(outcome.to_json(), ensure_ascii=False))
        return True
    print(f"glm-infill fill: text {number}: {problem}", file=sys.stderr)
    if output_format is OutputFormat.TEXT:
        print()  # still one line per text
    return False


def _start_engine(args: argparse.Namespace, options: dict[str, Any]) -> InfillEngine:
    """The engine on `--model`, or on the demo checkpoint (said on stderr)."""
    model = args.model
    if model is None:
        from pipeline.glm.demo import demo_checkpoint, demo_notice

        print(f"glm-infill fill: {demo_notice()} (--model DIR)", file=sys.stderr)
        model = demo_checkpoint()
    return start_engine("fill", args.engine, model, args.dtype, args.device, options,
                        args.debug)


def main(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    options = given_engine_options(args, "fill", {args.engine})[args.engine]
    require_installed("fill", args.engine)
    try:
        params = SamplingParams(**{n: getattr(args, n) for n in SamplingSettings.model_fields})
    except ValidationError as err:
        problems = "; ".join(f"{flag(str(e['loc'][0]))}: {e['msg']}" for e in err.errors())
        _usage_error(problems)
    stream = _open_input(args)
    output_format = OutputFormat(args.output_format)
    failed = False
    with _start_engine(args, options) as engine, stream or contextlib.nullcontext():
        for batch in _batches(_texts(args, stream)):
            outcomes = _fill(engine, batch, args.multi_mask, params)
            for (i, _), outcome in zip(batch, outcomes, strict=True):
                failed |= not _report(i + 1, outcome, output_format)
            sys.stdout.flush()
    return 1 if failed else 0
