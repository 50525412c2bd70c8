"""The report's charts: matplotlib figures drawn by the Agg backend into PNG and base64-encoded,
so the page carries them inline (nothing beside it, nothing fetched when it is opened).

Figures are made with `matplotlib.figure.Figure`, not pyplot: no global state, so the end of a
run can draw them from any thread without touching a display.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from collections.abc import Iterable

from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.glm.tokenization import GMASK, MASK, SMASK
from pipeline.report.data import OK, Throughput

WIDTH_IN = 10.0
PANEL_HEIGHT_IN = 2.6
DPI = 96
MAX_BINS = 40
GREEN, RED, BLUE, ORANGE = "#2e7d32", "#c62828", "#1565c0", "#ef6c00"
MASK_ORDER = (MASK, SMASK, GMASK)
FINISH_COLORS = {"stop": GREEN, "length": ORANGE}


def _panels(rows: int, cols: int = 1,
            height_in: float = PANEL_HEIGHT_IN) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=(WIDTH_IN, height_in * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = list(figure.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    return figure, axes


def _counts_axis(axis: Axis) -> None:
    """Whole numbers only on an axis of counts."""
    axis.set_major_locator(MaxNLocator(integer=True))


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def mask_kinds(kinds: Iterable[str]) -> list[str]:
    """Mask kinds in GLM's order ([MASK], [sMASK], [gMASK]), any other after them."""
    known = set(kinds)
    return [k for k in MASK_ORDER if k in known] + sorted(known - set(MASK_ORDER))


def throughput_chart(series: Throughput) -> str:
    figure, (rows, tokens, done) = _panels(3)
    rows.stairs(series.rows_per_s, series.edges_s, fill=True, color=BLUE, alpha=0.7)
    rows.set_ylabel("rows / s")
    tokens.stairs(series.tokens_per_s, series.edges_s, fill=True, color=ORANGE, alpha=0.7)
    tokens.set_ylabel("output tokens / s")
    done.step([0.0, *series.commits_s], [0, *series.rows_done], where="post", color=GREEN)
    done.set_ylabel("rows committed")
    _counts_axis(done.yaxis)
    done.set_xlabel("seconds since the run started")
    for ax in (rows, tokens, done):
        ax.set_xlim(0, series.edges_s[-1])
    return _png(figure)


def outcomes_chart(outcomes: Counter) -> str:
    """Rows ok, then rows per error type, most frequent first."""
    labels = sorted(outcomes, key=lambda k: (k != OK, -outcomes[k], k))
    figure, (ax,) = _panels(1, height_in=max(1.6, 0.45 * len(labels) + 0.8))
    bars = ax.barh(labels, [outcomes[k] for k in labels],
                   color=[GREEN if k == OK else RED for k in labels])
    ax.bar_label(bars, padding=3)
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    _counts_axis(ax.xaxis)
    ax.grid(axis="x", alpha=0.3)
    ax.grid(axis="y", visible=False)
    return _png(figure)


def _bins(values: Iterable[int]) -> list[float] | int:
    """One bin per token count while that stays readable, else MAX_BINS equal ones. At least
    three, so that the axis has whole numbers to label around a single value."""
    values = list(values)
    low, high = min(values), max(values)
    if high - low < 2:
        low, high = max(low - 1, 0), high + 1
    if high - low < MAX_BINS:
        return [v - 0.5 for v in range(low, high + 2)]
    return MAX_BINS


def _token_axes(ax: Axes, title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("tokens")
    _counts_axis(ax.xaxis)
    _counts_axis(ax.yaxis)


def _histogram(ax: Axes, counts: Counter, title: str, color: str) -> None:
    ax.hist(list(counts), weights=list(counts.values()), bins=_bins(counts), color=color)
    _token_axes(ax, title)


def _answers_histogram(ax: Axes, answers: Counter) -> None:
    """Answer tokens per blank, one stacked colour per mask kind."""
    kinds = mask_kinds(mask for mask, _ in answers)
    per_kind = [Counter({n: c for (m, n), c in answers.items() if m == kind}) for kind in kinds]
    ax.hist([list(c) for c in per_kind], weights=[list(c.values()) for c in per_kind],
            bins=_bins(n for _, n in answers), stacked=True, label=kinds)
    ax.legend(fontsize=8)
    _token_axes(ax, "answer tokens per blank")


def lengths_chart(prompt_tokens: Counter, output_tokens: Counter, answers: Counter) -> str:
    """Histograms over the rows that succeeded (all three counters non-empty)."""
    figure, (prompts, outputs, blanks) = _panels(1, 3, height_in=3.0)
    _histogram(prompts, prompt_tokens, "prompt tokens per row", BLUE)
    _histogram(outputs, output_tokens, "output tokens per row", ORANGE)
    _answers_histogram(blanks, answers)
    prompts.set_ylabel("count")
    return _png(figure)


def _grouped_bars(ax: Axes, groups: list[str], series: dict[str, list[float]],
                  colors: dict[str, str] | None = None) -> None:
    """Bars of each series side by side within each group, with their values on top."""
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        offsets = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(offsets, values, width, label=name, color=(colors or {}).get(name))
        ax.bar_label(bars, padding=2, fontsize=8, fmt="{:g}")
    ax.set_xticks(range(len(groups)), groups)
    ax.legend(fontsize=8)


def finish_chart(finish_reasons: Counter) -> str:
    """Blanks per finish reason (`stop`, `length`), by mask kind."""
    kinds = mask_kinds(mask for mask, _ in finish_reasons)
    reasons = sorted({reason for _, reason in finish_reasons})
    figure, (ax,) = _panels(1, height_in=3.0)
    _grouped_bars(ax, kinds, {r: [finish_reasons[(k, r)] for k in kinds] for r in reasons},
                  FINISH_COLORS)
    ax.set_ylabel("blanks")
    _counts_axis(ax.yaxis)
    return _png(figure)


def quality_chart(quality: dict[str, dict[str, float]]) -> str:
    """Exact match and token F1 per mask kind (and over whole rows)."""
    kinds = list(quality)
    figure, (ax,) = _panels(1, height_in=3.0)
    _grouped_bars(ax, kinds, {metric: [round(quality[k][metric], 3) for k in kinds]
                              for metric in ("exact_match", "token_f1")})
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("rate")
    return _png(figure)
