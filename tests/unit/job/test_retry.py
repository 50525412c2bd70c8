"""What counts as a fault, and the retries around faults (no Ray, no sleeping to speak of)."""

from __future__ import annotations

import pytest

from pipeline.job.retry import RetryPolicy, is_fault, retry_stream, root_cause, with_retries

FAST = RetryPolicy(attempts=3, first_backoff_s=0.0, max_backoff_s=0.0)


class Flaky:
    def __init__(self, failures: list[BaseException]):
        self.failures = list(failures)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "done"


def test_faults_are_retried_until_they_pass() -> None:
    flaky = Flaky([OSError("connection refused"), ConnectionResetError("reset")])
    assert with_retries(flaky, "reading", FAST) == "done" and flaky.calls == 3


def test_a_persistent_fault_is_raised_after_the_last_attempt() -> None:
    flaky = Flaky([OSError("down")] * 5)
    with pytest.raises(OSError, match="down"):
        with_retries(flaky, "reading", FAST)
    assert flaky.calls == 3


@pytest.mark.parametrize("error", [ValueError("bad footer"),
                                   OSError("Truncated compressed stream"),
                                   KeyError("x")])
def test_data_problems_and_bugs_are_not_retried(error: BaseException) -> None:
    flaky = Flaky([error])
    with pytest.raises(type(error)):
        with_retries(flaky, "reading", FAST)
    assert flaky.calls == 1
    assert not is_fault(error)


def test_a_stream_restarts_and_skips_what_it_already_gave() -> None:
    given: list[int] = []
    attempts = []

    def stream():
        attempts.append(1)
        for i in range(5):
            if i in given:
                continue
            if i == 2 and len(attempts) == 1:
                raise OSError("connection lost mid-stream")
            given.append(i)
            yield i

    assert list(retry_stream(stream, "reading", FAST)) == [0, 1, 2, 3, 4]
    assert len(attempts) == 2


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(attempts=6, first_backoff_s=0.5, max_backoff_s=3)
    assert [policy.backoff(a) for a in range(5)] == [0.5, 1.0, 2.0, 3, 3]


def test_root_cause_is_one_line_of_the_innermost_error() -> None:
    try:
        try:
            raise FileNotFoundError("[Errno 2] /in/f1.jsonl\nmore detail")
        except FileNotFoundError as inner:
            raise RuntimeError("ray::ReadUnit() failed\nTraceback ...") from inner
    except RuntimeError as outer:
        assert root_cause(outer) == "FileNotFoundError: [Errno 2] /in/f1.jsonl"


def test_root_cause_finds_the_original_in_a_remote_traceback() -> None:
    remote = RuntimeError("ray::MapBatches(write_units)() (pid=1, ip=1.2.3.4)\n"
                          "Traceback (most recent call last):\n"
                          '  File "write.py", line 9, in _commit\n'
                          "OSError: [Errno 28] No space left on device")
    assert root_cause(remote) == "OSError: [Errno 28] No space left on device"
