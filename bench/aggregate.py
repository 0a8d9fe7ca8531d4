"""Label aggregation speed: items/s of majority vote, Dawid-Skene and alpha at 1M items x 3.

    uv run python -m bench.aggregate [--items 1000000] [--overlap 3] [--compare 200000]

Synthetic seeded crowd (200 annotators of accuracy 0.3 to 0.95, four classes). The
limit measured in the same run is crowd-kit's ``DawidSkene`` (a dev dependency) on the
first ``--compare`` items of the same data: the printed ratio is our Dawid-Skene's
items/s over crowd-kit's, with the share of items on which both agree.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from services.marketplace import aggregation

T = TypeVar("T")


def crowd(n_items: int, overlap: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    k, annotators = 4, 200
    truth = rng.integers(0, k, n_items)
    items = np.repeat(np.arange(n_items, dtype=np.int32), overlap)
    who = rng.integers(0, annotators, len(items)).astype(np.int32)
    accuracy = rng.uniform(0.3, 0.95, annotators)
    right = rng.random(len(items)) < accuracy[who]
    classes = np.where(right, truth[items], rng.integers(0, k, len(items))).astype(np.int32)
    return truth, items, who, classes


def timed(label: str, n_items: int, run: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - started
    print(f"{label:<28} {seconds:8.2f} s  {n_items / seconds:12,.0f} items/s")
    return n_items / seconds, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--overlap", type=int, default=3)
    parser.add_argument("--compare", type=int, default=200_000)
    args = parser.parse_args()
    truth, items, who, classes = crowd(args.items, args.overlap)
    print(f"{args.items:,} items x {args.overlap} answers, 200 annotators, 4 classes")
    _, vote = timed("majority vote", args.items, lambda: aggregation.majority_vote(items, classes))
    _, ds = timed("Dawid-Skene", args.items, lambda: aggregation.dawid_skene(items, who, classes))
    timed(
        "one-coin Dawid-Skene",
        args.items,
        lambda: aggregation.dawid_skene(items, who, classes, one_coin=True),
    )
    timed(
        "Krippendorff's alpha",
        args.items,
        lambda: aggregation.krippendorff_alpha_nominal(items, classes),
    )
    print(
        f"accuracy: majority vote {np.mean(vote.labels == truth):.4f}, "
        f"Dawid-Skene {np.mean(ds.labels == truth):.4f}"
    )

    import pandas as pd
    from crowdkit.aggregation import DawidSkene

    n = min(args.compare, args.items)
    rows = n * args.overlap  # items are laid out item by item
    sub = items[:rows], who[:rows], classes[:rows]
    ours_rate, ours = timed(f"Dawid-Skene ({n:,})", n, lambda: aggregation.dawid_skene(*sub))
    frame = pd.DataFrame({"task": sub[0], "worker": sub[1], "label": sub[2]})

    def crowd_kit() -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return DawidSkene(n_iter=100).fit_predict(frame).sort_index().to_numpy()

    theirs_rate, theirs = timed(f"crowd-kit DawidSkene ({n:,})", n, crowd_kit)
    same = np.mean(ours.labels == theirs)
    print(f"ratio ours/crowd-kit: {ours_rate / theirs_rate:.1f}x, same label on {same:.4f}")


if __name__ == "__main__":
    main()
