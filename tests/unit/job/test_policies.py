"""Prompt policies and the token budget, on GLM's real sentencepiece tokenizer (the demo
tokenizer shipped in the package is the upstream one, so ../shared is not needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.glm.tokenization import GMASK, MASK, SMASK, GLMTokenizer
from pipeline.job.config import validate
from pipeline.job.policies import POLICIES, Policy, PromptResult, build_prompt
from tests.fixtures import DEMO_TOKENIZER

ROOT = Path(__file__).resolve().parents[3]

TEXT = ("The quick brown fox jumps over the lazy dog near the river bank. It was a sunny day! "
        "Birds sang in the trees, and children played in the park until the evening came.")


@pytest.fixture(scope="module")
def tok(demo_tokenizer: GLMTokenizer) -> GLMTokenizer:
    return demo_tokenizer


def cfg(policy: str = "as_is", *, template: str | None = None, seed: int = 0,
        max_prompt_tokens: int | None = None, on_overflow: str = "error",
        **sections: dict) -> SimpleNamespace:
    """A stand-in for pipeline.job.config.PromptConfig with the same attribute names."""
    parts = {"span": dict(mask_ratio=0.15, mean_length=3.0, max_spans=3),
             "sentence": dict(max_sentences=1),
             "suffix": dict(keep_ratio=0.5, min_keep_words=1)}
    for name, values in sections.items():
        parts[name] = {**parts[name], **values}
    return SimpleNamespace(
        policy=policy, template=template, seed=seed,
        budget=SimpleNamespace(max_prompt_tokens=max_prompt_tokens, on_overflow=on_overflow),
        **{name: SimpleNamespace(**values) for name, values in parts.items()})


def build(tok: GLMTokenizer, text: object, config: SimpleNamespace, key: str = "row-1",
          msl: int = 1024) -> PromptResult:
    return build_prompt({"text": text}, config, tok, msl, row_key=key)


def refill(prompt: str, removed: list[str], mask: str) -> str:
    """Put the target strings back in place of the masks, in order."""
    pieces = prompt.split(mask)
    assert len(removed) == len(pieces) - 1
    return "".join(p + r for p, r in zip(pieces, [*removed, ""], strict=True))


# -- bad rows ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", sorted(set(POLICIES) - {"template"}))
@pytest.mark.parametrize(("value", "error_type"), [
    (None, "missing_text"), ("", "empty_text"), ("  \n ", "empty_text"), (42, "wrong_type"),
    (3.5, "wrong_type"), (b"bytes [MASK]", "wrong_type"), (["a", "[MASK]"], "wrong_type"),
])
def test_bad_text_is_an_error_row(tok, policy, value, error_type):
    result = build(tok, value, cfg(policy))
    assert (result.budget_action, result.error_type, result.target) == ("error", error_type, None)
    assert result.error_message


def test_missing_text_column(tok):
    result = build_prompt({"body": "a [MASK]"}, cfg(), tok, 1024, text_column="text")
    assert result.error_type == "missing_text"
    assert build_prompt({"body": "a [MASK]"}, cfg(), tok, 1024, text_column="body").text


def test_text_that_is_not_unicode_is_an_error(tok):
    assert build(tok, "bad \udcff byte [MASK]", cfg()).error_type == "encode_error"


def test_unknown_policy_is_a_config_error(tok):
    with pytest.raises(ValueError, match="prompt.policy"):
        build(tok, "a [MASK]", cfg("bogus"))


def test_every_policy_has_a_builder():
    assert set(POLICIES) == set(Policy)


@pytest.mark.parametrize("policy", list(Policy))
def test_the_real_prompt_config_works(tok, policy):
    """The duck-typed stand-in above and the job's PromptConfig give the same prompts."""
    template = "{text} Why? [MASK]" if policy is Policy.TEMPLATE else None
    text = TEXT.replace("sunny", MASK) if policy is Policy.AS_IS else TEXT
    prompt = validate({"source": {"paths": "x"}, "output": {"path": "o"},
                       "prompt": {"policy": str(policy), "template": template}}).prompt
    result = build(tok, text, prompt)
    assert result == build(tok, text, cfg(str(policy), template=template))
    assert result.error_type is None and result.budget_action == "fits"


# -- as_is ------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [MASK, SMASK, GMASK])
def test_as_is_keeps_the_text(tok, mask):
    text = f"Paris is the capital of {mask} ."
    assert build(tok, text, cfg()) == PromptResult(text, None, "fits")


@pytest.mark.parametrize("text", ["no blank here", "[mask] is lower case", "[UNK] only"])
def test_as_is_without_a_known_mask(tok, text):
    result = build(tok, text, cfg())
    assert result.error_type == "no_mask" and "[MASK]" in result.error_message


# -- template ---------------------------------------------------------------------------
def test_template_formats_the_row(tok):
    row = {"question": "What is two plus two?", "text": None}
    result = build_prompt(row, cfg("template", template="Q: {question} A: [MASK]"), tok, 1024)
    assert result == PromptResult("Q: What is two plus two? A: [MASK]", None, "fits")


@pytest.mark.parametrize(("template", "row"), [
    ("Q: {question} A: [MASK]", {"text": "x"}),
    ("Q: {question} A: [MASK]", {"question": None}),
    ("Q: {question A: [MASK]", {"question": "q"}),
    ("Q: {} A: [MASK]", {"question": "q"}),
    ("Q: {question.real.imag} A: [MASK]", {"question": "q"}),
])
def test_template_errors(tok, template, row):
    result = build_prompt(row, cfg("template", template=template), tok, 1024)
    assert (result.budget_action, result.error_type) == ("error", "template_error")


def test_template_without_mask(tok):
    result = build_prompt({"question": "q"}, cfg("template", template="Q: {question}"), tok, 1024)
    assert result.error_type == "no_mask"


# -- span -------------------------------------------------------------------------------
def test_span_is_seeded_per_row_and_repeatable(tok):
    first = [build(tok, TEXT, cfg("span"), key=f"row-{i}") for i in range(20)]
    again = [build(tok, TEXT, cfg("span"), key=f"row-{i}") for i in range(20)]
    assert first == again
    assert len({r.text for r in first}) > 5  # different rows get different spans
    other_seed = [build(tok, TEXT, cfg("span", seed=1), key=f"row-{i}") for i in range(20)]
    assert other_seed != first


def test_span_golden_value(tok):
    """Pins the sampler: a change here changes every user's prompts (SHA-256 + random())."""
    result = build(tok, TEXT, cfg("span"), key="golden")
    assert result.text == GOLDEN_SPAN_PROMPT
    assert result.target == GOLDEN_SPAN_TARGET


GOLDEN_SPAN_PROMPT = ("The quick brown fox jumps over the [MASK] near the river bank. It was a "
                      "sunny day! Birds sang in the trees, and children played in the [MASK] "
                      "the evening [MASK]")
GOLDEN_SPAN_TARGET = ["lazy dog", "park until", "came."]


def test_span_does_not_depend_on_python_hash_seed(tok):
    code = textwrap.dedent(f"""
        from types import SimpleNamespace as N
        from pipeline.job.policies import build_prompt
        from pipeline.glm.tokenization import load_tokenizer
        cfg = N(policy="span", seed=0, span=N(mask_ratio=0.15, mean_length=3.0, max_spans=3),
                budget=N(max_prompt_tokens=None, on_overflow="error"))
        tok = load_tokenizer({str(DEMO_TOKENIZER)!r})
        print(build_prompt({{"text": {TEXT!r}}}, cfg, tok, 1024, row_key="golden").text)
    """)
    outputs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=60,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2")}
    assert outputs == {GOLDEN_SPAN_PROMPT + "\n"}


@pytest.mark.parametrize("ratio", [0.05, 0.15, 0.5, 0.9])
@pytest.mark.parametrize("max_spans", [1, 3, 8])
def test_span_masks_are_separate_and_refill_to_the_text(tok, ratio, max_spans):
    words = len(TEXT.split())
    for i in range(30):
        config = cfg("span", span=dict(mask_ratio=ratio, max_spans=max_spans))
        result = build(tok, TEXT, config, key=str(i))
        assert result.error_type is None, result
        removed = result.target
        assert 1 <= len(removed) == result.text.count(MASK) <= max_spans
        assert f"{MASK} {MASK}" not in result.text
        assert refill(result.text, result.target, MASK) == TEXT
        masked = sum(len(r.split()) for r in removed)
        assert masked <= max(1, round(ratio * words))
        if len(removed) < max_spans and ratio <= 0.5:  # stopped at the ratio, none dropped
            assert masked == max(1, round(ratio * words))


@pytest.mark.parametrize("text", ["one", "两"])
def test_span_needs_two_words(tok, text):
    assert build(tok, text, cfg("span")).error_type == "too_short"


def test_span_on_chinese_masks_characters(tok):
    text = "今天天气很好我们去公园散步吧"
    result = build(tok, text, cfg("span", span=dict(mask_ratio=0.3)))
    assert refill(result.text, result.target, MASK) == text


# -- sentence ---------------------------------------------------------------------------
def test_sentence_masks_whole_sentences(tok):
    sentences = ["The quick brown fox jumps over the lazy dog near the river bank.",
                 "It was a sunny day!",
                 "Birds sang in the trees, and children played in the park until the "
                 "evening came."]
    for i in range(10):
        result = build(tok, TEXT, cfg("sentence"), key=str(i))
        assert result.text.count(SMASK) == 1
        assert result.target[0] in sentences
        assert refill(result.text, result.target, SMASK) == TEXT


def test_sentence_keeps_one_sentence_of_context(tok):
    result = build(tok, TEXT, cfg("sentence", sentence=dict(max_sentences=5)))
    assert result.text.count(SMASK) == 2
    assert refill(result.text, result.target, SMASK) == TEXT
    assert build(tok, "Only one sentence here.", cfg("sentence")).error_type == "too_short"


def test_sentence_on_chinese_punctuation(tok):
    text = "今天天气很好。我们去公园散步吧！好的。"
    result = build(tok, text, cfg("sentence", sentence=dict(max_sentences=2)))
    assert result.text.count(SMASK) == 2
    assert refill(result.text, result.target, SMASK) == text


# -- suffix -----------------------------------------------------------------------------
def test_suffix_keeps_a_prefix(tok):
    result = build(tok, "one two three four five six", cfg("suffix"))
    assert result == PromptResult("one two three [gMASK]", ["four five six"], "fits")
    result = build(tok, "one two three four", cfg("suffix", suffix=dict(keep_ratio=0.1)))
    assert result.text == "one [gMASK]"


def test_suffix_minimum_words(tok):
    config = cfg("suffix", suffix=dict(min_keep_words=3))
    assert build(tok, "one two three", config).error_type == "too_short"
    assert build(tok, "one two three four", config).text == "one two three [gMASK]"
    no_prefix = cfg("suffix", suffix=dict(min_keep_words=0, keep_ratio=0.1))
    assert build(tok, "single", no_prefix) == PromptResult(GMASK, ["single"], "fits")


# -- budget -----------------------------------------------------------------------------
def tokens(tok: GLMTokenizer, text: str) -> int:
    return len(tok.encode(text))


def test_budget_counts_cls_and_eos(tok):
    text = "Paris is the capital of [MASK] ."
    exact = tokens(tok, text)
    assert build(tok, text, cfg(max_prompt_tokens=exact)).budget_action == "fits"
    over = build(tok, text, cfg(max_prompt_tokens=exact - 1))
    assert (over.budget_action, over.error_type) == ("error", "too_long")
    assert build(tok, text, cfg(), msl=exact - 1).error_type == "too_long"
    # a budget above the model's limit is capped by it
    assert build(tok, text, cfg(max_prompt_tokens=5000), msl=exact - 1).error_type == "too_long"


def test_truncate_keeps_the_words_next_to_a_final_gmask(tok):
    text = TEXT + " " + GMASK
    result = build(tok, text, cfg(max_prompt_tokens=20, on_overflow="truncate"))
    assert result.budget_action == "truncated" and result.error_type is None
    assert tokens(tok, result.text) <= 20
    assert text.endswith(result.text) and result.text.endswith(GMASK)
    bigger = build(tok, text, cfg(max_prompt_tokens=21, on_overflow="truncate"))
    assert len(bigger.text) >= len(result.text)


def test_truncate_drops_the_farthest_context_on_both_sides(tok):
    text = TEXT.replace("sunny", MASK)
    result = build(tok, text, cfg(max_prompt_tokens=16, on_overflow="truncate"))
    assert result.budget_action == "truncated" and tokens(tok, result.text) <= 16
    assert result.text in text and MASK in result.text
    before, after = result.text.split(MASK)
    assert abs(len(before.split()) - len(after.split())) <= 1  # centred on the mask


def test_truncate_keeps_text_between_masks(tok):
    text = f"far away words {MASK} middle words that stay {MASK} more far words"
    limit = tokens(tok, f"{MASK} middle words that stay {MASK}")
    result = build(tok, text, cfg(max_prompt_tokens=limit, on_overflow="truncate"))
    assert result.text == f"{MASK} middle words that stay {MASK}"
    failed = build(tok, text, cfg(max_prompt_tokens=limit - 1, on_overflow="truncate"))
    assert (failed.budget_action, failed.error_type) == ("error", "too_long")


def test_truncate_applies_after_the_policy_and_keeps_the_target(tok):
    long_text = " ".join(["word"] * 400) + ". Last sentence here."
    config = cfg("suffix", suffix=dict(keep_ratio=0.9), max_prompt_tokens=30,
                 on_overflow="truncate")
    result = build(tok, long_text, config)
    assert result.budget_action == "truncated" and result.text.endswith(GMASK)
    assert tokens(tok, result.text) <= 30
    assert long_text.endswith(result.target[0])


# -- the sample corpus (data/sample) ----------------------------------------------------
DATA = ROOT / "data"
BAD_ROW_ERRORS = {"bad-null": "missing_text", "bad-empty": "empty_text",
                  "bad-number": "wrong_type", "bad-no-mask": "no_mask",
                  "bad-too-long": "too_long", "plain-bad-null": "missing_text",
                  "plain-bad-empty": "empty_text"}


def sample_rows(kind: str) -> list[dict]:
    import gzip

    import pyarrow.parquet as pq

    if kind == "plain":
        return pq.read_table(DATA / "sample" / "plain" / "part-000.parquet").to_pylist()
    files = sorted((DATA / "sample" / "masked").iterdir())
    return [json.loads(line) for f in files
            for line in (gzip.decompress(f.read_bytes()) if f.suffix == ".gz"
                         else f.read_bytes()).decode().splitlines()]


def test_sample_corpus_is_what_the_script_makes(tmp_path):
    subprocess.run([sys.executable, str(DATA / "make_sample.py"), str(tmp_path)], check=True,
                   timeout=60)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for name in made:
        assert (tmp_path / name).read_bytes() == (DATA / "sample" / name).read_bytes(), name
    assert len(sample_rows("masked")) + len(sample_rows("plain")) >= 250


@pytest.mark.parametrize(("kind", "policy", "template"), [
    ("masked", "as_is", None), ("plain", "span", None), ("plain", "sentence", None),
    ("plain", "suffix", None), ("plain", "template", "Question: {question} Answer: [MASK]"),
])
def test_sample_rows_build(tok, kind, policy, template):
    rows = sample_rows(kind)
    results = {row["id"]: build_prompt(row, cfg(policy, template=template), tok, 512,
                                       row_key=row["id"]) for row in rows}
    for row in rows:
        result = results[row["id"]]
        if policy == "template":
            expected = None if row["question"] else "template_error"
        else:
            expected = BAD_ROW_ERRORS.get(row["id"])
        assert result.error_type == expected, (row, result)
    assert sum(r.error_type is None for r in results.values()) >= 40


# -- answers brought by pre-masked rows (source.target_column) ---------------------------
@pytest.mark.parametrize(("value", "target"), [
    (["Paris", "blue"], ["Paris", "blue"]),
    ('["Paris", "blue"]', ["Paris", "blue"]),  # a string column holding a JSON array
    (None, None),
])
def test_target_column_gives_the_target(tok, value, target):
    row = {"text": "It is in [MASK] and [MASK].", "answers": value}
    result = build_prompt(row, cfg("as_is"), tok, 512, target_column="answers")
    assert (result.error_type, result.target) == (None, target)


@pytest.mark.parametrize("value", [7, ["Paris", 3], "Paris", {"a": "b"}])
def test_a_target_that_is_no_list_of_strings_is_the_rows_error(tok, value):
    row = {"text": "It is in [MASK].", "answers": value}
    result = build_prompt(row, cfg("as_is"), tok, 512, target_column="answers")
    assert result.error_type == "wrong_type"
    assert "target column 'answers' must hold a list of strings" in result.error_message


def test_a_policy_target_is_what_it_removed(tok):
    row = {"text": "One two three four five six.", "answers": ["ignored"]}
    result = build_prompt(row, cfg("suffix"), tok, 512, target_column="answers")
    assert result.target == ["four five six."]
