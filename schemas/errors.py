"""Every `error_type` code the pipeline can write into an output row.

One list, so that the code that sets a code, the documentation in `schemas/README.md` and the
tests that check the two agree (tests/unit/test_schemas.py).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorType(StrEnum):
    """A row's own problem; infrastructure faults never become one of these."""

    # read: the input row itself
    INVALID_JSON = "invalid_json"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_TEXT = "invalid_text"
    LINE_TOO_LONG = "line_too_long"
    MISSING_ID = "missing_id"
    MISSING_TEXT = "missing_text"
    EMPTY_TEXT = "empty_text"
    WRONG_TYPE = "wrong_type"
    # prompt: the policy and the token budget
    ENCODE_ERROR = "encode_error"
    NO_MASK = "no_mask"
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    TEMPLATE_ERROR = "template_error"
    PROMPT_ERROR = "prompt_error"
    # generate: a request the engine refuses (an engine failure is a fault, never a row error)
    BAD_REQUEST = "bad_request"
    REJECTED = "rejected"
