"""Flags shared by the commands: derived from the typed models, so they match the config."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from pydantic import BaseModel


def usage_error(command: str, message: str) -> NoReturn:
    """One line on stderr and exit status 2, never a traceback."""
    print(f"glm-infill {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


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
        group.add_argument(flag(name), dest=name, type=kind, default=default, help=help_text)
