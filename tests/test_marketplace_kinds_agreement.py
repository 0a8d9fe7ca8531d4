"""Comparing answers with gold answers, kind by kind."""

from __future__ import annotations

import pytest

from services.marketplace.kinds import agreement, category, correct


def test_single_label_is_exact() -> None:
    assert correct("single_label", {"label": "a"}, {"label": "a"})
    assert not correct("single_label", {"label": "a"}, {"label": "b"})


def test_multi_label_is_jaccard() -> None:
    assert agreement("multi_label", {"labels": ["a", "b"]}, {"labels": ["b", "a"]}) == 1.0
    assert agreement("multi_label", {"labels": ["a"]}, {"labels": ["a", "b"]}) == 0.5
    assert agreement("multi_label", {"labels": []}, {"labels": []}) == 1.0
    assert category("multi_label", {"labels": ["b", "a"]}) == "a|b"


def test_spans_match_by_label_and_overlap() -> None:
    gold = {"spans": [{"start": 0, "end": 10, "label": "ORG"}]}
    near = {"spans": [{"start": 1, "end": 10, "label": "ORG"}]}
    wrong_label = {"spans": [{"start": 0, "end": 10, "label": "PER"}]}
    assert correct("span", near, gold)
    assert agreement("span", wrong_label, gold) == 0.0
    extra = {"spans": [*near["spans"], {"start": 20, "end": 25, "label": "ORG"}]}
    assert agreement("span", extra, gold) == pytest.approx(2 / 3)


def test_boxes_need_half_overlap() -> None:
    gold = {"boxes": [{"x": 0, "y": 0, "w": 10, "h": 10, "label": "car"}]}
    shifted = {"boxes": [{"x": 5, "y": 0, "w": 10, "h": 10, "label": "car"}]}  # IoU 1/3
    assert agreement("bbox", shifted, gold) == 0.0
    close = {"boxes": [{"x": 1, "y": 1, "w": 10, "h": 10, "label": "car"}]}
    assert correct("bbox", close, gold)


def test_transcription_folds_case_and_spaces() -> None:
    assert agreement("transcription", {"text": "Hello  World"}, {"text": "hello world"}) == 1.0
    assert agreement("transcription", {"text": "kitten"}, {"text": "sitting"}) == pytest.approx(
        1 - 3 / 7
    )
    assert not correct("transcription", {"text": "abc"}, {"text": "xyz"})
