"""``devices.fork_map``: independent CPU work side by side in forked processes, each with its share
of the cores' threads; a failure or an interruption ends every worker at once."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch

from histodiffusion.devices import cpu_cores, fork_map


def test_each_index_runs_once_in_a_worker_with_its_share_of_the_threads() -> None:
    table = {i: torch.full((4,), float(i)) for i in range(6)}  # reached through fork; the closure is never pickled

    def fn(i: int) -> tuple[int, int, float]:
        return os.getpid(), torch.get_num_threads(), float(table[i].sum())

    got = dict(fork_map(fn, 6, workers=2))
    assert sorted(got) == list(range(6))
    pids = {pid for pid, _, _ in got.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert {threads for _, threads, _ in got.values()} == {max(1, cpu_cores() // 2)}
    assert [got[i][2] for i in range(6)] == [4.0 * i for i in range(6)]
    assert not multiprocessing.active_children()


def test_one_worker_gets_every_core() -> None:
    (_, threads), = fork_map(lambda _i: torch.get_num_threads(), 1, workers=1)
    assert threads == cpu_cores()


def test_a_failure_ends_the_other_workers_at_once() -> None:
    def fn(i: int) -> int:
        if i == 0:
            raise ValueError("tile 0 is corrupt")
        time.sleep(60)  # would hold the caller for a minute if the pool waited for it
        return i

    t0 = time.monotonic()
    with pytest.raises(ValueError, match="tile 0 is corrupt"):
        list(fork_map(fn, 3, workers=2))
    assert time.monotonic() - t0 < 20
    assert not multiprocessing.active_children()


def test_leaving_early_ends_the_workers_and_keeps_what_was_yielded() -> None:
    def fn(i: int) -> int:
        if i > 0:
            time.sleep(60)
        return i

    results = fork_map(fn, 3, workers=2)
    assert next(results) == (0, 0)
    t0 = time.monotonic()
    results.close()  # what an exception in the caller's loop (Ctrl-C, SIGTERM) does through contextlib.closing
    assert time.monotonic() - t0 < 20
    assert not multiprocessing.active_children()
