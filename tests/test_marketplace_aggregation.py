"""Label aggregation (pure numpy), checked on seeded synthetic crowds and against crowd-kit."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from services.marketplace import aggregation as ag

K = 4


def _confusion(accuracy: float) -> np.ndarray:
    """``m[answered, true]``: right with ``accuracy``, else any other class evenly."""
    m = np.full((K, K), (1 - accuracy) / (K - 1))
    np.fill_diagonal(m, accuracy)
    return m


def crowd(seed: int, n_items: int = 3000, overlap: int = 5):
    """A heterogeneous crowd with known confusion matrices: few good, many near-random,
    some biased towards class 0, some middling; each item gets ``overlap`` annotators."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(K, size=n_items, p=[0.4, 0.3, 0.2, 0.1])
    matrices = [_confusion(0.92) for _ in range(4)]
    matrices += [_confusion(1 / K + 0.07) for _ in range(14)]
    for _ in range(6):
        biased = 0.5 * _confusion(0.55)
        biased[0, :] += 0.5  # says "0" half of the time whatever the item is
        matrices.append(biased)
    matrices += [_confusion(0.7) for _ in range(6)]
    conf = np.stack(matrices)
    items = np.repeat(np.arange(n_items), overlap)
    annotators = np.concatenate(
        [rng.choice(len(matrices), size=overlap, replace=False) for _ in range(n_items)]
    )
    probabilities = conf[annotators, :, truth[items]]  # (answers, answered class)
    draws = rng.random(len(items))[:, None]
    classes = (draws > probabilities.cumsum(axis=1)).sum(axis=1)
    return truth, items, annotators, np.minimum(classes, K - 1)


# -- majority vote -------------------------------------------------------------------
def test_majority_vote_share_and_ties_go_to_the_smallest_class() -> None:
    items = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    classes = [2, 2, 1, 3, 1, 0, 3, 3, 0]
    result = ag.majority_vote(items, classes, n_items=4)
    assert result.method == "majority_vote"
    assert result.labels.tolist() == [2, 1, 0, -1]  # item 1: 1 beats 3; item 2: 0 beats 3
    assert result.confidence.tolist() == pytest.approx([2 / 3, 1 / 2, 1 / 2, 0.0])


def test_majority_vote_rejects_mismatched_or_negative_input() -> None:
    with pytest.raises(ValueError):
        ag.majority_vote([0, 1], [0])
    with pytest.raises(ValueError):
        ag.majority_vote([0, -1], [0, 1])


# -- Dawid-Skene ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dawid_skene_beats_majority_vote_on_a_mixed_crowd(seed: int) -> None:
    truth, items, annotators, classes = crowd(seed)
    vote = ag.majority_vote(items, classes)
    ds = ag.dawid_skene(items, annotators, classes)
    vote_accuracy = float((vote.labels == truth).mean())
    ds_accuracy = float((ds.labels == truth).mean())
    assert ds.converged and ds.method == "dawid_skene"
    assert ds_accuracy >= vote_accuracy + 0.08, (ds_accuracy, vote_accuracy)
    assert ((ds.confidence >= 0) & (ds.confidence <= 1)).all()
    # The good annotators (0-3) are recognised as such, the near-random ones (4-17) not.
    diagonal = np.einsum("akk->ak", ds.confusion)
    assert diagonal[:4].mean() > 0.85
    assert diagonal[4:18].mean() < 0.45
    # The biased annotators (18-23) answer "0" for items that are really "3".
    assert ds.confusion[18:24, 0, 3].mean() > 0.4


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dawid_skene_agrees_with_crowd_kit(seed: int) -> None:
    from crowdkit.aggregation import DawidSkene

    truth, items, annotators, classes = crowd(seed)
    frame = pd.DataFrame({"task": items, "worker": annotators, "label": classes})
    with warnings.catch_warnings():  # crowd-kit's own pandas deprecations
        warnings.simplefilter("ignore")
        theirs = DawidSkene(n_iter=100).fit_predict(frame).sort_index()
    assert theirs.index.tolist() == list(range(len(truth)))
    ours = ag.dawid_skene(items, annotators, classes)
    same = ours.labels == theirs.to_numpy()
    assert same.mean() >= 0.99, same.mean()
    # They differ only where the posterior is split anyway.
    assert (ours.confidence[~same] < 0.9).all()


def test_one_coin_dawid_skene_beats_majority_vote() -> None:
    truth, items, annotators, classes = crowd(4)
    vote = ag.majority_vote(items, classes)
    one_coin = ag.dawid_skene(items, annotators, classes, one_coin=True)
    assert one_coin.method == "one_coin_dawid_skene"
    assert (one_coin.labels == truth).mean() > (vote.labels == truth).mean() + 0.03
    # One accuracy per annotator: the off-diagonal cells of a matrix are all equal.
    off = one_coin.confusion[0][~np.eye(K, dtype=bool)]
    assert np.allclose(off, off[0])


def test_known_items_pin_their_class_and_teach_the_model() -> None:
    truth, items, annotators, classes = crowd(5, n_items=1500)
    known = np.full(len(truth), -1)
    gold = np.arange(0, len(truth), 5)  # every fifth item is gold
    known[gold] = truth[gold]
    free = ag.dawid_skene(items, annotators, classes)
    taught = ag.dawid_skene(items, annotators, classes, known=known)
    assert (taught.labels[gold] == truth[gold]).all()
    assert (taught.confidence[gold] == 1.0).all()
    rest = np.setdiff1d(np.arange(len(truth)), gold)
    assert (taught.labels[rest] == truth[rest]).mean() >= (free.labels[rest] == truth[rest]).mean()


def test_dawid_skene_items_without_answers_and_stopping() -> None:
    result = ag.dawid_skene([0, 0, 2], [0, 1, 0], [1, 1, 0], n_items=4, max_iter=3)
    assert result.labels.tolist()[1] == -1 and result.labels.tolist()[3] == -1
    assert result.confidence[1] == 0 and result.iterations <= 3
    assert result.labels[0] == 1
    empty = ag.dawid_skene([], [], [], n_items=2)
    assert empty.labels.tolist() == [-1, -1]


def test_unanimous_answers_give_near_certain_posteriors() -> None:
    items = np.repeat(np.arange(200), 3)
    annotators = np.tile([0, 1, 2], 200)
    classes = np.repeat(np.arange(200) % 3, 3)
    result = ag.dawid_skene(items, annotators, classes)
    assert (result.labels == np.arange(200) % 3).all()
    assert result.confidence.min() > 0.99


# -- Krippendorff's alpha ------------------------------------------------------------
# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: four
# observers, twelve units, missing values; nominal alpha = 0.743.
TEXTBOOK = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


def _triples(table: list[list[int | None]]) -> tuple[list[int], list[int]]:
    items, classes = [], []
    for row in table:
        for unit, value in enumerate(row):
            if value is not None:
                items.append(unit)
                classes.append(value - 1)
    return items, classes


def test_krippendorff_alpha_textbook_example() -> None:
    items, classes = _triples(TEXTBOOK)
    assert ag.krippendorff_alpha_nominal(items, classes) == pytest.approx(0.743, abs=5e-4)


def test_krippendorff_alpha_matches_an_independent_implementation() -> None:
    import krippendorff

    rng = np.random.default_rng(7)
    coders, units = 6, 400
    truth = rng.integers(0, 5, units)
    table = np.where(rng.random((coders, units)) < 0.7, truth, rng.integers(0, 5, (coders, units)))
    table = table.astype(float)
    table[rng.random((coders, units)) < 0.4] = np.nan  # many missing values
    expected = krippendorff.alpha(reliability_data=table, level_of_measurement="nominal")
    coder_idx, unit_idx = np.nonzero(~np.isnan(table))
    ours = ag.krippendorff_alpha_nominal(unit_idx, table[coder_idx, unit_idx].astype(int))
    assert ours == pytest.approx(expected, abs=1e-9)
    textbook = np.array([[np.nan if v is None else v for v in row] for row in TEXTBOOK])
    items, classes = _triples(TEXTBOOK)
    assert ag.krippendorff_alpha_nominal(items, classes) == pytest.approx(
        krippendorff.alpha(reliability_data=textbook, level_of_measurement="nominal")
    )


def test_krippendorff_alpha_edge_cases() -> None:
    assert ag.krippendorff_alpha_nominal([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    # Single-value units drop out: adding them changes nothing.
    base = ag.krippendorff_alpha_nominal([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 0])
    more = ag.krippendorff_alpha_nominal([0, 0, 1, 1, 2, 2, 3, 4], [0, 1, 1, 1, 0, 0, 1, 0])
    assert base == more
    assert math.isnan(ag.krippendorff_alpha_nominal([0, 1, 2], [0, 1, 0]))  # nothing pairable
    assert math.isnan(ag.krippendorff_alpha_nominal([0, 0, 1, 1], [2, 2, 2, 2]))  # no variation
    assert math.isnan(ag.krippendorff_alpha_nominal([], []))
    # Systematic disagreement goes below zero.
    assert ag.krippendorff_alpha_nominal([0, 0, 1, 1], [0, 1, 1, 0]) < 0
