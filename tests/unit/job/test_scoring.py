"""Scoring fills against targets: exact match, token F1, a row's columns, the manifest totals."""

from __future__ import annotations

import pytest

from pipeline.job.scoring import (
    SCORE_COLUMNS,
    exact_match,
    normalise,
    quality_totals,
    score_columns,
    token_f1,
)


def test_normalise_strips_and_collapses_whitespace() -> None:
    assert normalise("  the\t quick \n\n brown  ") == "the quick brown"
    assert normalise(" \n ") == ""


@pytest.mark.parametrize(("answer", "target", "exact"), [
    ("Paris", "Paris", True),
    (" Paris\n", "Paris", True),
    ("New  York", "New York", True),
    ("paris", "Paris", False),  # case matters
    ("Paris.", "Paris", False),  # so does punctuation
    ("北京", "北京", True),
    ("北 京", "北京", False),  # a space is a difference, also in Chinese
    ("", "", True),
])
def test_exact_match(answer: str, target: str, exact: bool) -> None:
    assert exact_match(answer, target) is exact


@pytest.mark.parametrize(("answer", "target", "f1"), [
    ("the cat sat", "the cat sat", 1.0),
    ("the cat", "the cat sat", 0.8),  # precision 1, recall 2/3
    ("a dog", "the cat", 0.0),
    ("the the cat", "the cat", 0.8),  # a multiset: the second "the" is not shared
    ("cat the", "the cat", 1.0),  # order does not count
    ("北京大学", "北京", 2 / 3),  # every CJK character is a token
    ("我在北京。", "我在上海。", 0.6),
    ("", "", 1.0),
    ("  ", "", 1.0),
    ("", "Paris", 0.0),
    ("Paris", "", 0.0),
])
def test_token_f1(answer: str, target: str, f1: float) -> None:
    assert token_f1(answer, target) == pytest.approx(f1)


def test_a_rows_columns() -> None:
    assert score_columns(["Paris", "a dog"], ["Paris", "the cat"]) == {
        "blank_exact_match": [True, False], "blank_token_f1": [1.0, 0.0],
        "exact_match": False, "token_f1": 0.5}
    assert score_columns(["Paris"], ["Paris"])["exact_match"] is True


@pytest.mark.parametrize(("answers", "target"), [
    (["Paris"], None),  # as_is, template: nothing removed
    (["Paris", "Rome"], ["Paris"]),  # the input itself held a mask: which fill is which?
])
def test_rows_without_a_known_answer_per_fill_are_not_scored(answers, target) -> None:
    assert score_columns(answers, target) == dict.fromkeys(SCORE_COLUMNS)


def test_totals_add_the_parts_in_mask_order() -> None:
    parts = [{"rows": {"count": 1, "exact": 1, "f1_sum": 1.0},
              "[gMASK]": {"count": 1, "exact": 1, "f1_sum": 1.0}},
             {},
             {"[sMASK]": {"count": 2, "exact": 0, "f1_sum": 1.0},
              "[MASK]": {"count": 3, "exact": 1, "f1_sum": 2.0},
              "rows": {"count": 2, "exact": 0, "f1_sum": 1.0}}]
    totals = quality_totals(parts)
    assert list(totals) == ["[MASK]", "[sMASK]", "[gMASK]", "rows"]
    assert totals["[MASK]"] == {"blanks": 3, "exact": 1, "exact_match": 0.333333,
                                "token_f1": 0.666667}
    assert totals["rows"] == {"scored": 3, "exact": 1, "exact_match": 0.333333,
                              "token_f1": 0.666667}
    assert quality_totals([{}, {}]) == {}
