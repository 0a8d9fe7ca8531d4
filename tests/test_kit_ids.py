"""Identifiers: non-guessable, shaped, and strictly increasing within a process."""

from __future__ import annotations

import itertools
import threading

from services.kit.ids import looks_like, new_id


def test_ids_have_the_prefix_and_shape() -> None:
    value = new_id("firm")
    assert looks_like("firm", value)
    assert not looks_like("user", value)
    assert not looks_like("firm", value[:-1])
    assert not looks_like("firm", value[:-1] + "u")  # u is not in the alphabet


def test_ids_increase_strictly_even_within_one_millisecond() -> None:
    ids = [new_id("evt") for _ in range(20_000)]  # many share a millisecond
    tails = [i.split("_", 1)[1] for i in ids]
    assert tails == sorted(tails)
    assert len(set(tails)) == len(tails)


def test_ids_from_several_threads_are_unique_and_each_thread_sees_them_increase() -> None:
    out: dict[int, list[str]] = {}

    def make(n: int) -> None:
        out[n] = [new_id("evt") for _ in range(5_000)]

    threads = [threading.Thread(target=make, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for ids in out.values() for i in ids]
    assert len(set(every)) == len(every)
    for ids in out.values():
        assert ids == sorted(ids)


def _number(value: str) -> int:
    alphabet = "0123456789abcdefghjkmnpqrstvwxyz"
    out = 0
    for char in value.split("_", 1)[1]:
        out = out * 32 + alphabet.index(char)
    return out


def test_consecutive_ids_are_not_guessable_from_each_other() -> None:
    """Inside one millisecond the next id steps up by a random amount, not by one."""
    ids = [new_id("item") for _ in range(1_000)]
    steps = {_number(b) - _number(a) for a, b in itertools.pairwise(ids)}
    assert min(steps) >= 1
    assert 1 not in steps or len(steps) > 900
