"""Build a GLM prompt for one input row: a masking policy, then the token budget.

Policies (`prompt.policy`), one small function each, picked from `POLICIES`:

- `as_is`: the text already holds `[MASK]` / `[sMASK]` / `[gMASK]`.
- `template`: `prompt.template` formatted over the row's columns (`"Q: {question} A: [MASK]"`).
- `span`: GLM-style random word spans -> `[MASK]`, Poisson span lengths, seeded per row.
- `sentence`: whole sentences -> `[sMASK]`, seeded per row.
- `suffix`: keep a prefix of the words, append `[gMASK]`.

Words are runs of non-space characters, and every CJK character is a word of its own, so
Chinese text without spaces can be masked and truncated too. Masked text is replaced in place;
everything else in the text is kept byte for byte.

`target` is what a policy removed, so fills can be scored (`scoring.py`): a list of strings, one
per mask in prompt order (`target[i]` pairs with the i-th fill); None for `as_is` and
`template`, which remove nothing.

Randomness comes from `random.Random` seeded with a SHA-256 of `(prompt.seed, row_key)`,
drawing only `random()` (the one stream Python guarantees across versions), so a re-run builds
the same prompts. Callers pass the row's stable id as `row_key`.

Budget: the prompt's hub encoding (`[CLS] text <|endoftext|>`) must have at most
`min(budget.max_prompt_tokens or max_sequence_length, max_sequence_length)` tokens. Otherwise
`on_overflow: error` gives error `too_long`; `truncate` drops the context words farthest from
every mask (text before the first mask and after the last one; ties drop from the left, GLM's
truncation side) until it fits, and says `truncated`. Text between masks is never dropped.

Bad row data never raises: it becomes a `PromptResult` with an `error_type`: `missing_text`,
`empty_text`, `wrong_type` (the read stage's checks), `encode_error`, `no_mask`,
`template_error`, `too_short` or `too_long` (schemas/errors.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
import string
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from pipeline.glm.procedures import replace_spans
from pipeline.glm.requests import InfillError
from pipeline.glm.tokenization import GMASK, MASK, SMASK, GLMTokenizer
from pipeline.job.rows import read_target, require_text
from schemas.errors import ErrorType


class Policy(StrEnum):
    AS_IS = "as_is"
    TEMPLATE = "template"
    SPAN = "span"
    SENTENCE = "sentence"
    SUFFIX = "suffix"


_CJK = "\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
# Word units: runs of non-space characters, every CJK character a word of its own (also the
# tokens of token F1, scoring.py).
WORD = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
# A sentence runs to . ! ? followed by a space or the end, to 。！？, or to the end of the text.
_SENTENCE = re.compile(r"\S.*?(?:[.!?]+(?=\s|$)|[。！？]+|$)", re.S)

Span = tuple[int, int]  # [start, end) character offsets


@dataclasses.dataclass(frozen=True)
class PromptResult:
    text: str | None  # the prompt; on error, as far as it was built (None before a policy ran)
    target: list[str] | None  # the removed strings, one per mask, or None
    budget_action: str  # 'fits' | 'truncated' | 'error'
    error_type: str | None = None
    error_message: str | None = None


# -- helpers ---------------------------------------------------------------------------
def _words(text: str) -> list[Span]:
    return [m.span() for m in WORD.finditer(text)]


def _rng(seed: int, row_key: str) -> random.Random:
    """A per-row generator; SHA-256, unlike hash(), is the same in every process and run."""
    digest = hashlib.sha256(f"{seed}\x00{row_key}".encode("utf-8", "surrogatepass")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's Poisson sampler (only uses rng.random())."""
    limit, count, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count


def _choose(rng: random.Random, n: int, k: int) -> list[int]:
    """k distinct indexes out of range(n), sorted (partial Fisher-Yates on rng.random())."""
    pool = list(range(n))
    for i in range(k):
        j = i + int(rng.random() * (n - i))
        pool[i], pool[j] = pool[j], pool[i]
    return sorted(pool[:k])


def _replace(text: str, spans: list[Span], mask: str) -> tuple[str, list[str]]:
    """Put `mask` in place of each (sorted, disjoint) span; return the prompt and the removed."""
    return (replace_spans(text, spans, [mask] * len(spans)),
            [text[start:end] for start, end in spans])


def _too_short(policy: str, need: str) -> InfillError:
    return InfillError(ErrorType.TOO_SHORT, f"policy {policy!r} needs {need}")


# -- policies: (row, cfg, text_column, row_key) -> (prompt text, removed strings | None) --
Removed = list[str] | None


def _as_is(row: dict, cfg: Any, text_column: str, row_key: str) -> tuple[str, Removed]:
    return require_text(row, text_column), None


def _template(row: dict, cfg: Any, text_column: str, row_key: str) -> tuple[str, Removed]:
    template = cfg.template or ""
    try:
        fields = {name.split(".")[0].split("[")[0]
                  for _, name, _, _ in string.Formatter().parse(template) if name}
        missing = sorted(f for f in fields if row.get(f) is None)
        prompt = None if missing else template.format_map(row)
    except (KeyError, IndexError, AttributeError, ValueError, TypeError) as err:
        raise InfillError(ErrorType.TEMPLATE_ERROR, f"template {template!r}: {err!r}") from None
    if prompt is None:
        raise InfillError(ErrorType.TEMPLATE_ERROR, f"template column(s) {missing} missing or null")
    return prompt, None


def _span(row: dict, cfg: Any, text_column: str, row_key: str) -> tuple[str, Removed]:
    """GLM span corruption: Poisson lengths up to mask_ratio of the words, random gaps."""
    text = require_text(row, text_column)
    words = _words(text)
    if len(words) < 2:
        raise _too_short("span", "at least 2 words")
    rng = _rng(cfg.seed, row_key)
    goal = min(max(1, round(cfg.span.mask_ratio * len(words))), len(words) - 1)
    lengths: list[int] = []
    while sum(lengths) < goal and len(lengths) < cfg.span.max_spans:
        lengths.append(min(max(1, _poisson(rng, cfg.span.mean_length)), goal - sum(lengths)))
    while len(lengths) > len(words) - sum(lengths) + 1:  # too few kept words to separate them
        lengths.pop()
    kept = len(words) - sum(lengths)
    # Each span goes into its own gap among the kept words, so spans never touch.
    gaps = _choose(rng, kept + 1, len(lengths))
    spans = []
    for index, (gap, length) in enumerate(zip(gaps, lengths, strict=True)):
        start = gap + sum(lengths[:index])  # kept words before the gap + earlier masked words
        spans.append((words[start][0], words[start + length - 1][1]))
    return _replace(text, spans, MASK)


def _sentence(row: dict, cfg: Any, text_column: str, row_key: str) -> tuple[str, Removed]:
    """Random whole sentences -> [sMASK], at least one sentence left as context."""
    text = require_text(row, text_column)
    sentences = [m.span() for m in _SENTENCE.finditer(text)]
    count = min(cfg.sentence.max_sentences, len(sentences) - 1)
    if count < 1:
        raise _too_short("sentence", "at least 2 sentences")
    chosen = _choose(_rng(cfg.seed, row_key), len(sentences), count)
    return _replace(text, [sentences[i] for i in chosen], SMASK)


def _suffix(row: dict, cfg: Any, text_column: str, row_key: str) -> tuple[str, Removed]:
    """Keep the first keep_ratio of the words, the rest becomes the [gMASK] target. The text
    up to the first removed word is kept as it is, with its own whitespace (none between
    Chinese characters), so the spliced answer restores the text."""
    text = require_text(row, text_column)
    words = _words(text)
    keep = min(max(cfg.suffix.min_keep_words, round(cfg.suffix.keep_ratio * len(words))),
               len(words) - 1)
    if keep < cfg.suffix.min_keep_words:
        raise _too_short("suffix", f"more than {cfg.suffix.min_keep_words} word(s)")
    return text[:words[keep][0]] + GMASK, [text[words[keep][0]:].rstrip()]


POLICIES: dict[Policy, Callable[[dict, Any, str, str], tuple[str, Removed]]] = {
    Policy.AS_IS: _as_is,
    Policy.TEMPLATE: _template,
    Policy.SPAN: _span,
    Policy.SENTENCE: _sentence,
    Policy.SUFFIX: _suffix,
}


# -- budget ----------------------------------------------------------------------------
def _token_count(tokenizer: GLMTokenizer, text: str) -> int:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InfillError(ErrorType.ENCODE_ERROR, f"text is not valid Unicode: {err}") from None
    return len(tokenizer.encode(text))


def _mask_spans(tokenizer: GLMTokenizer, text: str) -> list[Span]:
    spans = tokenizer.mask_spans(text)
    if not spans:
        raise InfillError(ErrorType.NO_MASK, "prompt has no mask token this tokenizer knows "
                          f"({', '.join(tokenizer.task_masks)})")
    return spans


def _trim_options(text: str, masks: list[Span]) -> list[Span]:
    """Prompt windows text[a:b], each dropping one more context word, farthest from a mask first."""
    words = _words(text)
    left = [w for w in words if w[1] <= masks[0][0]]
    right = [w for w in words if w[0] >= masks[-1][1]]
    # left word i is len(left) - i words from the first mask, right word j is j + 1 from the last
    order = sorted([(len(left) - i, 0, i) for i in range(len(left))]
                   + [(j + 1, 1, j) for j in range(len(right))], key=lambda d: (-d[0], d[1]))
    start, end, windows = 0, len(text), []
    for _, side, index in order:
        if side == 0:
            start = left[index + 1][0] if index + 1 < len(left) else masks[0][0]
        else:
            end = right[index - 1][1] if index > 0 else masks[-1][1]
        windows.append((start, end))
    return windows


def _fit(tokenizer: GLMTokenizer, text: str, limit: int, on_overflow: str) -> tuple[str, str]:
    """The prompt within `limit` tokens and the budget action, or an InfillError('too_long')."""
    count = _token_count(tokenizer, text)
    if count <= limit:
        return text, "fits"
    too_long = f"prompt is {count} tokens, the budget is {limit}"
    if on_overflow != "truncate":
        raise InfillError(ErrorType.TOO_LONG, too_long)
    windows = _trim_options(text, _mask_spans(tokenizer, text))
    if not windows or _token_count(tokenizer, text[slice(*windows[-1])]) > limit:
        raise InfillError(ErrorType.TOO_LONG, too_long + "; still over after dropping all context")
    low, high = 0, len(windows) - 1  # windows[high] fits; find the first window that fits
    while low < high:
        middle = (low + high) // 2
        if _token_count(tokenizer, text[slice(*windows[middle])]) <= limit:
            high = middle
        else:
            low = middle + 1
    return text[slice(*windows[high])], "truncated"


def build_prompt(row: dict, prompt_cfg: Any, tokenizer: GLMTokenizer, max_sequence_length: int,
                 text_column: str = "text", row_key: str = "",
                 target_column: str | None = None) -> PromptResult:
    """One row's prompt under `prompt_cfg` (duck-typed `PromptConfig`); errors become results.
    The target is what the policy removed, else the row's `target_column`."""
    policy = POLICIES.get(prompt_cfg.policy)
    if policy is None:
        raise ValueError(f"prompt.policy must be one of {', '.join(POLICIES)}, "
                         f"got {prompt_cfg.policy!r}")
    budget = prompt_cfg.budget
    limit = min(budget.max_prompt_tokens or max_sequence_length, max_sequence_length)
    text = None
    try:
        text, removed = policy(row, prompt_cfg, text_column, row_key)
        if removed is None and target_column is not None:
            removed = read_target(row, target_column)
        _mask_spans(tokenizer, text)
        text, action = _fit(tokenizer, text, limit, budget.on_overflow)
    except InfillError as err:
        return PromptResult(text, None, "error", err.error_type, str(err))
    return PromptResult(text, removed, action)
