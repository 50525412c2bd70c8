"""Retries for infrastructure faults: storage that is down, slow or throttling, a worker that
died. A row's own problem is never retried (it becomes an error row); damaged data (a corrupt
footer, a truncated archive) is not a fault either and is not retried.

The policy comes from the job's `retry:` section; it changes how a run copes, never what a row
becomes, so it is not part of the config hash.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)
T = TypeVar("T")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*: ")
DAMAGE_MARKERS = ("compressed stream", "inflate", "decompress", "zstd", "gzip")


class RetryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    attempts: int = Field(6, ge=1, description="tries of each storage operation")
    first_backoff_s: float = Field(0.5, ge=0, description="wait before the second try")
    max_backoff_s: float = Field(30.0, ge=0, description="longest wait between tries")

    def backoff(self, attempt: int) -> float:
        return min(self.first_backoff_s * 2 ** attempt, self.max_backoff_s)


def is_damaged_data(err: BaseException) -> bool:
    """A decompression failure: the bytes are bad, reading them again will not help."""
    message = str(err).lower()
    return isinstance(err, OSError) and any(marker in message for marker in DAMAGE_MARKERS)


def is_fault(err: BaseException) -> bool:
    """Storage and network trouble (pyarrow and boto raise OSError for all of it)."""
    return isinstance(err, OSError) and not is_damaged_data(err)


def _wait(policy: RetryPolicy, attempt: int, what: str, err: Exception) -> None:
    delay = policy.backoff(attempt)
    logger.warning("%s failed (%s: %s); try %d of %d in %.1fs", what, type(err).__name__, err,
                   attempt + 2, policy.attempts, delay)
    time.sleep(delay)


def with_retries(operation: Callable[[], T], what: str,
                 policy: RetryPolicy | None = None) -> T:
    """Run `operation`, retrying faults with exponential backoff; the last fault is raised."""
    policy = policy or RetryPolicy()
    for attempt in range(policy.attempts):
        try:
            return operation()
        except Exception as err:
            if not is_fault(err) or attempt + 1 == policy.attempts:
                raise
            _wait(policy, attempt, what, err)
    raise AssertionError("unreachable")


def retry_stream(make: Callable[[], Iterator[T]], what: str,
                 policy: RetryPolicy | None = None) -> Iterator[T]:
    """Yield from `make()`, starting it again after a fault; `make` must skip what an earlier
    attempt already yielded."""
    policy = policy or RetryPolicy()
    for attempt in range(policy.attempts):
        try:
            yield from make()
            return
        except Exception as err:
            if not is_fault(err) or attempt + 1 == policy.attempts:
                raise
            _wait(policy, attempt, what, err)


def root_cause(err: BaseException) -> str:
    """One line naming the original error. Ray wraps a worker's exception in its own (Ray Data
    once more in UserCodeException) and carries the original only as traceback text: the first
    exception line there that is not Ray's own is the cause."""
    chain, seen = [err], {id(err)}
    while (inner := getattr(err, "cause", None) or err.__cause__) is not None \
            and id(inner) not in seen:
        seen.add(id(inner))
        chain.append(err := inner)
    for error in chain:
        for line in ANSI.sub("", str(error)).splitlines():
            line = line.strip()
            if EXCEPTION_LINE.match(line) and not line.startswith("ray."):
                return line[:500]
    lines = [line for line in str(chain[-1]).splitlines() if line.strip()]
    return f"{type(chain[-1]).__name__}: {lines[0].strip() if lines else ''}"[:500]
