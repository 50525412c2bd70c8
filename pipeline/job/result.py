"""The outcome of a run as code and schedulers see it: `JobResult` (what `InfillJob.run()`
returns) and the `[glm-infill] result {JSON}` line `glm-infill run` prints last on every exit
path. Light on purpose (no Ray, no torch): `glm-infill submit` and the Airflow operator read
the line from a job's log with `find_result`."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class JobResult:
    """What a run returns (`InfillJob.run()`) and `glm-infill run` prints last as its
    `[glm-infill] result {JSON}` line: the outcome, the exit code of the CLI, the absolute
    output URI and the totals. `manifest` is the whole `_manifest.json` (None when the run
    stopped before it had one, e.g. on a config error)."""

    status: str
    exit_code: int
    output: str | None
    reason: str | None = None
    config_hash: str | None = None
    rows_in: int = 0
    rows_ok: int = 0
    rows_error: int = 0
    error_rate: float = 0.0
    output_tokens: int = 0
    wall_time_s: float = 0.0
    manifest: dict[str, Any] | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], exit_code: int) -> JobResult:
        fields = {f.name for f in dataclasses.fields(cls)} - {"exit_code", "manifest"}
        return cls(exit_code=exit_code, manifest=manifest,
                   **{name: manifest[name] for name in fields})

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def to_json(self) -> dict[str, Any]:
        """Everything but the manifest: the result line's payload."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "manifest"}


RESULT_MARK = "[glm-infill] result "


def result_line(result: JobResult) -> str:
    """The last line `glm-infill run` prints: what schedulers read from a job's log."""
    return RESULT_MARK + json.dumps(result.to_json())


def find_result(log: str) -> dict[str, Any] | None:
    """The payload of the last result line in a job's log (None if the run printed none, or
    a cut one: it died before the end, or it is not a glm-infill run)."""
    for line in reversed(log.splitlines()):
        if line.startswith(RESULT_MARK):
            try:
                return json.loads(line[len(RESULT_MARK):])
            except json.JSONDecodeError:
                return None
    return None
