"""Label aggregation over crowd answers: majority vote, Dawid-Skene, Krippendorff's alpha.

Pure numpy, no database: the caller turns answers into three equally long integer
arrays, one entry per answer — ``items`` (0 … n_items-1), ``annotators``
(0 … n_annotators-1) and ``classes`` (0 … n_classes-1, the answer's category) — and
gets one label and one confidence per item back. Every loop runs over classes or EM
iterations, never over answers, so a million items with three answers each aggregate
in seconds.

Ties are broken towards the **smallest class index**: callers number classes in the
order they want ties to go (the marketplace uses the order of the task's label schema,
then the canonical answer text).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

MAJORITY_VOTE = "majority_vote"
DAWID_SKENE = "dawid_skene"
ONE_COIN = "one_coin_dawid_skene"

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class Aggregation:
    """One label per item (``-1`` where an item has no answer) and its confidence in [0, 1].

    For majority vote the confidence is the winning class's share of the item's answers;
    for Dawid-Skene it is the posterior probability of the chosen class.
    """

    method: str
    labels: NDArray[np.int32]
    confidence: FloatArray
    iterations: int = 0
    converged: bool = True
    priors: FloatArray = field(default_factory=lambda: np.zeros(0))
    """Dawid-Skene's class priors; empty for majority vote."""
    confusion: FloatArray = field(default_factory=lambda: np.zeros((0, 0, 0)))
    """Dawid-Skene's ``[annotator, answered class, true class]`` probabilities."""


def _triples(
    items: ArrayLike, classes: ArrayLike, annotators: ArrayLike | None = None
) -> tuple[IntArray, IntArray, IntArray]:
    item_arr = np.asarray(items, dtype=np.int64).ravel()
    class_arr = np.asarray(classes, dtype=np.int64).ravel()
    ann_arr = (
        np.zeros_like(item_arr)
        if annotators is None
        else np.asarray(annotators, dtype=np.int64).ravel()
    )
    if not (len(item_arr) == len(class_arr) == len(ann_arr)):
        raise ValueError("items, annotators and classes must have the same length")
    for name, arr in (("items", item_arr), ("annotators", ann_arr), ("classes", class_arr)):
        if len(arr) and arr.min() < 0:
            raise ValueError(f"{name} must be non-negative indices")
    return item_arr, ann_arr, class_arr


def _size(given: int | None, arr: IntArray) -> int:
    found = int(arr.max()) + 1 if len(arr) else 0
    if given is None:
        return found
    if given < found:
        raise ValueError(f"an index {found - 1} is out of range for size {given}")
    return given


# -- majority vote -------------------------------------------------------------------
def majority_vote(
    items: ArrayLike, classes: ArrayLike, *, n_items: int | None = None
) -> Aggregation:
    """The most frequent class per item; a tie goes to the smallest class index."""
    item_arr, _, class_arr = _triples(items, classes)
    n = _size(n_items, item_arr)
    labels = np.full(n, -1, dtype=np.int32)
    confidence = np.zeros(n)
    if not len(item_arr):
        return Aggregation(MAJORITY_VOTE, labels, confidence)
    n_classes = int(class_arr.max()) + 1
    pairs, counts = np.unique(item_arr * n_classes + class_arr, return_counts=True)
    pair_item, pair_class = np.divmod(pairs, n_classes)
    # Per item: highest count first, then the smallest class; the first row wins.
    order = np.lexsort((pair_class, -counts, pair_item))
    ordered_items = pair_item[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = ordered_items[1:] != ordered_items[:-1]
    winners = order[first]
    totals = np.bincount(item_arr, minlength=n)
    won = pair_item[winners]
    labels[won] = pair_class[winners]
    confidence[won] = counts[winners] / totals[won]
    return Aggregation(MAJORITY_VOTE, labels, confidence)


# -- Dawid-Skene ---------------------------------------------------------------------
def dawid_skene(
    items: ArrayLike,
    annotators: ArrayLike,
    classes: ArrayLike,
    *,
    n_items: int | None = None,
    n_annotators: int | None = None,
    n_classes: int | None = None,
    known: ArrayLike | None = None,
    max_iter: int = 100,
    tol: float = 1e-6,
    smoothing: float = 0.1,
    one_coin: bool = False,
) -> Aggregation:
    """Dawid & Skene (1979): each annotator's confusion matrix and each item's true class by EM.

    - Starts from the majority vote's class shares per item (like crowd-kit), then
      alternates the M-step (class priors and confusion matrices from the posteriors) and
      the E-step (posteriors from priors and matrices, in log space).
    - ``smoothing`` is a Laplace pseudo-count added to every confusion-matrix cell and
      prior, so an annotator with few answers does not get probabilities of exactly 0 or 1.
    - It stops when the mean log-likelihood per answer improves by less than ``tol``, or
      after ``max_iter`` iterations.
    - ``known`` (optional, one class per item, ``-1`` for unknown) pins gold items to their
      class: they teach the model each annotator's confusions and never move.
    - ``one_coin`` replaces each matrix by one accuracy per annotator, errors spread evenly
      over the other classes: fewer parameters when classes are many and answers few.

    Items with no answer get label ``-1`` and confidence 0 and do not count in the priors.
    """
    item_arr, ann_arr, class_arr = _triples(items, classes, annotators)
    n = _size(n_items, item_arr)
    n_ann = _size(n_annotators, ann_arr)
    k = max(_size(n_classes, class_arr), 1)
    method = ONE_COIN if one_coin else DAWID_SKENE
    pinned = np.full(n, -1, dtype=np.int64) if known is None else np.asarray(known, np.int64)
    if pinned.shape != (n,):
        raise ValueError("known must hold one class (or -1) per item")
    if pinned.max(initial=-1) >= k:
        raise ValueError("a known class is out of range")
    if not len(item_arr):
        labels = np.full(n, -1, dtype=np.int32)
        return Aggregation(method, labels, np.zeros(n), priors=np.full(k, 1.0 / k))

    # Work on the items that have answers, renumbered 0 … m-1 and sorted, once.
    answered, local = np.unique(item_arr, return_inverse=True)
    m = len(answered)
    pair = ann_arr * k + class_arr  # (annotator, answered class) → row of the matrices
    n_pairs = n_ann * k
    known_local = pinned[answered]
    pin_rows = np.flatnonzero(known_local >= 0)
    pin_onehot = np.eye(k)[:, known_local[pin_rows]]
    # Posteriors are kept class-major, (k, m): each EM step is 2k weighted bincounts.

    def pin(posterior: FloatArray) -> FloatArray:
        posterior[:, pin_rows] = pin_onehot
        return posterior

    # Start: majority-vote shares.
    counts = np.bincount(class_arr * m + local, minlength=k * m).reshape(k, m).astype(float)
    posterior = pin(counts / counts.sum(axis=0, keepdims=True))
    answers_of = np.bincount(ann_arr, minlength=n_ann).astype(float)

    def m_step(post: FloatArray) -> tuple[FloatArray, FloatArray]:
        priors = (post.sum(axis=1) + smoothing) / (m + smoothing * k)
        if one_coin:
            hit = np.bincount(ann_arr, weights=post[class_arr, local], minlength=n_ann)
            accuracy = (hit + smoothing) / (answers_of + 2 * smoothing)
            accuracy = np.clip(accuracy, 1e-12, 1 - 1e-12)
            wrong = (1 - accuracy) / max(k - 1, 1)
            conf = np.repeat(wrong[:, None, None], k, axis=1).repeat(k, axis=2)
            diagonal = np.arange(k)
            conf[:, diagonal, diagonal] = accuracy[:, None]
            return priors, conf
        # confusion[a, l, c] ∝ Σ over a's answers l of P(item is c) + smoothing
        flat = np.empty((n_pairs, k))
        for c in range(k):
            flat[:, c] = np.bincount(pair, weights=post[c][local], minlength=n_pairs)
        conf = flat.reshape(n_ann, k, k) + smoothing
        conf /= conf.sum(axis=1, keepdims=True)
        return priors, conf

    def e_step(priors: FloatArray, conf: FloatArray) -> tuple[FloatArray, float]:
        log_conf = np.ascontiguousarray(np.log(conf).reshape(n_pairs, k).T)
        loglik = np.empty((k, m))
        for c in range(k):
            loglik[c] = np.bincount(local, weights=log_conf[c][pair], minlength=m)
        loglik += np.log(priors)[:, None]
        top = loglik.max(axis=0, keepdims=True)
        scaled = np.exp(loglik - top)
        total = scaled.sum(axis=0, keepdims=True)
        log_likelihood = float((np.log(total) + top).sum())
        return pin(scaled / total), log_likelihood

    priors, conf = m_step(posterior)
    previous = -np.inf
    iterations, converged = 0, False
    while iterations < max_iter:
        iterations += 1
        posterior, log_likelihood = e_step(priors, conf)
        priors, conf = m_step(posterior)
        if (log_likelihood - previous) / len(item_arr) < tol:
            converged = True
            break
        previous = log_likelihood
    labels = np.full(n, -1, dtype=np.int32)
    confidence = np.zeros(n)
    chosen = posterior.argmax(axis=0)  # the first maximum: ties go to the smallest class
    labels[answered] = chosen
    confidence[answered] = posterior[chosen, np.arange(m)]
    return Aggregation(method, labels, confidence, iterations, converged, priors, conf)


# -- agreement -----------------------------------------------------------------------
def krippendorff_alpha_nominal(items: ArrayLike, classes: ArrayLike) -> float:
    """Krippendorff's alpha for nominal data; NaN when it is undefined.

    One entry per value given by one coder to one unit; a coder who skipped a unit simply
    has no entry (missing values). Units with a single value cannot be paired and drop
    out. ``alpha = 1 - (n - 1) · Σ_u (m_u² - Σ_c n_uc²)/(m_u - 1) / (n² - Σ_c n_c²)``,
    with ``n_uc`` the values c in unit u, ``m_u`` the unit's values, ``n_c`` and ``n``
    the pairable totals (Krippendorff, *Computing Krippendorff's Alpha-Reliability*,
    2011). Undefined (NaN) when fewer than two values are pairable or every pairable
    value is the same class (no variation to agree on).
    """
    item_arr, _, class_arr = _triples(items, classes)
    if not len(item_arr):
        return float("nan")
    n_classes = int(class_arr.max()) + 1
    per_item = np.bincount(item_arr)
    pairable = per_item[item_arr] >= 2
    item_arr, class_arr = item_arr[pairable], class_arr[pairable]
    if not len(item_arr):
        return float("nan")
    pairs, n_uc = np.unique(item_arr * n_classes + class_arr, return_counts=True)
    pair_item = pairs // n_classes
    # Σ_u (m_u² - Σ_c n_uc²) / (m_u - 1), summed pair by pair
    squares = np.bincount(pair_item, weights=n_uc.astype(float) ** 2)
    units = np.unique(pair_item)
    m_units = per_item[units].astype(float)
    observed = float(((m_units**2 - squares[units]) / (m_units - 1)).sum())
    n_c = np.bincount(class_arr, minlength=n_classes).astype(float)
    n = float(n_c.sum())
    expected = n * n - float((n_c**2).sum())
    if n < 2 or expected == 0:
        return float("nan")
    return 1.0 - (n - 1) * observed / expected
