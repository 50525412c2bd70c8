"""The run report: one self-contained HTML page about a job's output (`_report.html` beside
the manifest), written at the end of every run and by `glm-infill report`.

data.py gathers the figures (manifest + parts, bounded memory), charts.py draws them
(matplotlib, inline PNG), page.py lays out the page.
"""

from __future__ import annotations

from pipeline.job.storage import OutputStore
from pipeline.report.data import NotAnOutput, collect
from pipeline.report.page import render_page

__all__ = ["NotAnOutput", "build_report", "write_report"]


def build_report(store: OutputStore) -> str:
    """The page for the output in `store`, as it is now."""
    return render_page(collect(store))


def write_report(store: OutputStore) -> None:
    """Write the page beside the manifest."""
    store.write_report(build_report(store))
