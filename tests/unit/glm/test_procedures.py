"""The procedures' `output_text`: the answers spliced into the user's own text, nothing else of
it changed. The procedures are driven by hand with scripted answers (no model needed)."""

from __future__ import annotations

import pytest

from pipeline.glm.procedures import (
    Fill,
    FillResult,
    Procedure,
    sequential,
    splice_fills,
    start_procedure,
)
from pipeline.glm.requests import SamplingParams, SpanResult
from pipeline.glm.tokenization import GMASK, MASK, SMASK, GLMTokenizer
from tests.fixtures import spliced

PARAMS = SamplingParams(max_new_tokens=4)
TEXTS = ["北京是[MASK]的首都吗？", "is [MASK] .", "glued[MASK]text", "[MASK][sMASK]",
         "Answer: [gMASK]", "a\u3000[MASK]\n\n[gMASK]  end", "[mask] is not a blank [MASK]"]


@pytest.fixture(scope="module")
def tok(demo_tokenizer: GLMTokenizer) -> GLMTokenizer:
    return demo_tokenizer


def answer(text: str) -> Fill:
    return Fill(MASK, text, [], "stop")


def drive(procedure: Procedure, spans: list[list[int]]) -> FillResult:
    """Run a procedure as an engine would, answering its blanks with `spans` in order."""
    spans = list(spans)
    request = next(procedure)
    try:
        while True:
            count = len(request.blank_positions)
            answers = [spans.pop(0) for _ in range(count)]
            request = procedure.send(SpanResult(answers, ["stop"] * count, [None] * count))
    except StopIteration as done:
        return done.value


@pytest.mark.parametrize(("text", "answers", "expected"), [
    ("北京是[MASK]的首都吗？", ["上海"], "北京是上海的首都吗？"),  # no spaces added, ？ kept
    ("is [MASK] .", ["Paris"], "is Paris ."),  # the spaces the tokenizer stripped stay
    ("glued[MASK]text", ["X"], "gluedXtext"),
    ("[MASK][sMASK]", ["one", "two"], "onetwo"),
    ("Answer: [gMASK]", ["forty two"], "Answer: forty two"),
    ("[MASK] and [MASK]", ["[MASK]", "b"], "[MASK] and b"),  # an answer is not a blank
    ("[mask] stays [MASK]", ["x"], "[mask] stays x"),  # not a mask token
])
def test_splice_replaces_only_the_blanks(tok, text: str, answers: list[str],
                                         expected: str) -> None:
    assert splice_fills(tok, text, [answer(a) for a in answers]) == expected


@pytest.mark.parametrize("text", TEXTS)
def test_the_text_and_the_ids_agree_on_the_blanks(tok, text: str) -> None:
    """The k-th span in the text holds the mask token of the k-th mask id."""
    names = [tok.mask_names[i] for i in tok.tokenize_ids(text) if i in tok.mask_names]
    assert [text[start:end] for start, end in tok.mask_spans(text)] == names


@pytest.mark.parametrize("multi_mask", ["iterative", "sequential"])
@pytest.mark.parametrize("text", TEXTS)
def test_procedures_splice_their_answers(tok, text: str, multi_mask: str) -> None:
    words = ["上海", "Paris", "two words", "中国"]
    spans = [tok.tokenize_ids(w) for w in words]
    result = drive(start_procedure(tok, 256, text, multi_mask, PARAMS), spans)
    assert [f.mask for f in result.fills] == [text[s:e] for s, e in tok.mask_spans(text)]
    assert result.output_text == spliced(text, [f.text for f in result.fills])


def test_chinese_keeps_its_characters(tok) -> None:
    """Decoding would give `北京是 上海 的首都 ⁇?`: spaces around Chinese, `？` unknown."""
    text = "北京是[MASK]的首都吗？"
    result = drive(start_procedure(tok, 256, text, "iterative", PARAMS),
                   [tok.tokenize_ids("上海")])
    assert result.output_text == f"北京是{result.fills[0].text}的首都吗？"


def test_sequential_on_a_text_ending_in_gmask(tok) -> None:
    """No eos follows the final [gMASK] in the ids; the text still gets its answer."""
    text = f"Say it {SMASK} and go on {GMASK}"
    result = drive(sequential(tok, text, PARAMS, 256),
                   [tok.tokenize_ids("once"), tok.tokenize_ids("two words")])
    assert result.prompt_token_ids[-1] == tok.token_id(GMASK)
    assert result.output_text == (f"Say it {result.fills[0].text} and go on "
                                  f"{result.fills[1].text}")
