"""The report page: one self-contained HTML document (inline CSS, charts as base64 PNG, no
script, no font or file to fetch), so it opens anywhere, offline, from a bucket or a mail."""

from __future__ import annotations

import datetime
import html
from collections import Counter
from typing import Any

import yaml

from pipeline.report import charts
from pipeline.report.data import OK, RunData

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1000px; padding: 0 1rem; color: #212121; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.15rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem;
     margin-top: 2rem; }
.sub { color: #616161; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #e0e0e0; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: 0.5rem 0; }
pre { background: #f5f5f5; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
.status { padding: 0.1rem 0.5rem; border-radius: 0.3rem; color: white; }
.succeeded { background: #2e7d32; } .failed { background: #c62828; }
.running { background: #1565c0; }
.note { color: #616161; font-style: italic; }
"""


def _escape(value: Any) -> str:
    return html.escape(str(value))


def _cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"<td>{_escape(value)}</td>"
    text = f"{value:,}" if isinstance(value, int) else f"{value:,.3f}"
    return f'<td class="num">{text}</td>'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(map(_cell, row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pairs(rows: list[tuple[str, Any]]) -> str:
    """A two-column table of names and values."""
    return "<table>" + "".join(f"<tr><th>{_escape(k)}</th>{_cell(v)}</tr>" for k, v in rows) \
        + "</table>"


def _image(png: str, alt: str) -> str:
    return f'<img alt="{_escape(alt)}" src="data:image/png;base64,{png}">'


def _section(title: str, *body: str) -> str:
    return f"<section><h2>{_escape(title)}</h2>{''.join(body)}</section>"


def _note(text: str) -> str:
    return f'<p class="note">{_escape(text)}</p>'


def _when(unix_time: float) -> str:
    moment = datetime.datetime.fromtimestamp(unix_time, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _summary(data: RunData) -> str:
    m = data.manifest
    this_run = m.get("this_run", {})
    rows = [("output", m.get("output")), ("config hash", m.get("config_hash")),
            ("schema version", m.get("schema_version")), ("started", _when(m["started_at"])),
            ("wall time (s)", m.get("wall_time_s")), ("rows in", m.get("rows_in")),
            ("rows ok", m.get("rows_ok")), ("rows with an error", m.get("rows_error")),
            ("error rate (max allowed)",
             f"{m.get('error_rate', 0):.3f} ({m.get('max_error_rate')})"),
            ("prompt tokens", m.get("prompt_tokens")), ("output tokens", m.get("output_tokens")),
            ("rows of the last run", this_run.get("rows")),
            ("rows / s (last run)", this_run.get("rows_per_s")),
            ("output tokens / s (last run)", this_run.get("output_tokens_per_s")),
            ("input files", m.get("files_total")), ("parts in the manifest", m.get("parts_total")),
            ("parts read for this page", data.parts_read)]
    if m.get("reason"):
        rows.insert(0, ("reason", m["reason"]))
    return _section("Summary", _pairs(rows))


def _throughput(data: RunData) -> str:
    series = data.throughput
    if series is None:
        return _section("Throughput over time", _note(
            "No part of the last run carries a commit time (everything was committed by an "
            "earlier run, or by a version that did not record it)."))
    return _section("Throughput over time", _image(
        charts.throughput_chart(series), "rows and output tokens per second over the run"),
        _note("Parts committed by the last run, by commit time; parts an earlier run committed "
              "are counted in the summary only."))


def _outcomes(outcomes: Counter) -> str:
    if not outcomes:
        return _section("Rows: ok and errors by type", _note("The output holds no rows."))
    total = sum(outcomes.values())
    labels = sorted(outcomes, key=lambda k: (k != OK, -outcomes[k], k))
    return _section("Rows: ok and errors by type",
                    _image(charts.outcomes_chart(outcomes), "rows ok and rows per error type"),
                    _table(["outcome", "rows", "share"],
                           [[k, outcomes[k], outcomes[k] / total] for k in labels]))


def _lengths(data: RunData) -> str:
    counts = data.counts
    if not counts.prompt_tokens or not counts.answer_tokens:
        return _section("Prompt and answer lengths", _note("No row was filled."))
    return _section("Prompt and answer lengths", _image(
        charts.lengths_chart(counts.prompt_tokens, counts.output_tokens, counts.answer_tokens),
        "histograms of prompt tokens, output tokens and answer tokens per blank"),
        _note("Rows that were filled; an answer's tokens exclude the stop token."))


def _finish(finish_reasons: Counter) -> str:
    if not finish_reasons:
        return ""
    kinds = charts.mask_kinds(mask for mask, _ in finish_reasons)
    reasons = sorted({reason for _, reason in finish_reasons})
    rows = [[k, *(finish_reasons[(k, r)] for r in reasons)] for k in kinds]
    return _section("Finish reasons", _image(charts.finish_chart(finish_reasons),
                                             "blanks per finish reason and mask kind"),
                    _table(["mask", *reasons], rows),
                    _note("stop: the model ended the answer; length: sampling.max_new_tokens "
                          "was reached."))


def _quality(quality: dict[str, dict[str, Any]]) -> str:
    """Only when the job scored its fills against targets."""
    if not quality:
        return ""
    rows = [[kind, entry.get("blanks", entry.get("scored")), entry["exact"],
             f"{100 * entry['exact_match']:.1f} %", entry["token_f1"]]
            for kind, entry in quality.items()]
    return _section("Quality by mask kind",
                    _table(["kind", "scored", "exact", "exact match", "token F1"], rows),
                    _note("Fills scored against the text the policy removed: blanks per mask "
                          "kind; under rows, whole rows (exact when every blank is)."),
                    _image(charts.quality_chart(quality), "exact match and token F1 by kind"))


def _problem_files(manifest: dict[str, Any]) -> str:
    files = [[uri, "unreadable", why] for uri, why in manifest.get("unreadable_files", {}).items()]
    files += [[uri, "damaged", why] for uri, why in manifest.get("damaged_files", {}).items()]
    return _section("Input files with problems", _table(["file", "problem", "why"], files)) \
        if files else ""


def _config(manifest: dict[str, Any]) -> str:
    versions = sorted(manifest.get("versions", {}).items())
    config = yaml.safe_dump(manifest.get("config", {}), sort_keys=False, allow_unicode=True)
    return _section("Config and versions", _pairs(versions), f"<pre>{_escape(config)}</pre>")


def render_page(data: RunData) -> str:
    manifest = data.manifest
    status = str(manifest.get("status", "unknown"))
    title = f"glm-infill run report: {manifest.get('output', '')}"
    body = "".join([
        f"<h1>{_escape(title)}</h1>",
        f'<p class="sub"><span class="status {_escape(status)}">{_escape(status)}</span> '
        f"report made {_when(data.made_at)}</p>",
        _summary(data), _throughput(data), _outcomes(data.counts.outcomes), _lengths(data),
        _finish(data.counts.finish_reasons), _quality(data.quality),
        _problem_files(manifest), _config(manifest)])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_escape(title)}</title><style>{CSS}</style></head>"
            f"<body>{body}</body></html>\n")
