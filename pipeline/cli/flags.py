"""Flags shared by the commands: derived from the typed models, so they match the config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Literal, NoReturn, get_args, get_origin

from pydantic import BaseModel


def usage_error(command: str, message: str) -> NoReturn:
    """One line on stderr and exit status 2, never a traceback."""
    print(f"glm-infill {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class OneLineParser(argparse.ArgumentParser):
    """A parser whose mistakes (a misspelt flag, a bad value) are one line and exit status 2,
    like the commands' own usage errors: the usage is what --help shows. Subcommands' parsers
    are of the same class."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def count_of_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `minimum` (else a one-line usage error)."""
    def count(text: str) -> int:
        number = int(text)
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {number}")
        return number

    return count


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel],
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
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        group.add_argument(flag(name), dest=name, type=kind, default=default, choices=choices,
                           help=help_text)
