"""``devices.fork_map``: independent CPU work side by side in forked processes of one torch thread
each; a failure, an interruption or a dead process ends every process at once."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import pytest
import torch

from histodiffusion.devices import fork_map


def test_each_index_runs_once_in_a_forked_process_of_one_thread() -> None:
    x = torch.randn(2**20)
    x.exp().sum()  # this process has used its OpenMP threads: a forked one must not start a team
    table = {i: torch.full((4,), float(i)) for i in range(6)}  # reached through fork; the closure is never pickled

    def fn(i: int) -> tuple[int, int, float]:
        x.exp().sum()
        return os.getpid(), torch.get_num_threads(), float(table[i].sum())

    got = dict(fork_map(fn, 6, processes=2))
    assert sorted(got) == list(range(6))
    pids = {pid for pid, _, _ in got.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert {threads for _, threads, _ in got.values()} == {1}
    assert [got[i][2] for i in range(6)] == [4.0 * i for i in range(6)]
    assert not multiprocessing.active_children()


def test_a_failure_ends_the_other_processes_at_once() -> None:
    def fn(i: int) -> int:
        if i == 0:
            raise ValueError("tile 0 is corrupt")
        time.sleep(60)  # would hold the caller for a minute if the pool waited for it
        return i

    t0 = time.monotonic()
    with pytest.raises(ValueError, match="tile 0 is corrupt"):
        list(fork_map(fn, 3, processes=2))
    assert time.monotonic() - t0 < 20
    assert not multiprocessing.active_children()


def test_what_finished_beside_a_failure_is_handed_back_before_it() -> None:
    def fn(i: int) -> int:
        if i == 1:
            raise ValueError("disk full")
        return i

    results = fork_map(fn, 2, processes=2)
    time.sleep(3)  # both done before the first result is asked for: either may come first
    got = []
    with pytest.raises(ValueError, match="disk full"):
        for i, _ in results:
            got.append(i)
    assert got == [0]


def test_closing_early_ends_the_processes_and_keeps_what_was_yielded() -> None:
    def fn(i: int) -> int:
        if i > 0:
            time.sleep(60)
        return i

    results = fork_map(fn, 3, processes=2)
    assert next(results) == (0, 0)
    t0 = time.monotonic()
    results.close()  # what an exception in the caller's loop does through contextlib.closing
    assert time.monotonic() - t0 < 20
    assert not multiprocessing.active_children()


def test_ctrl_c_while_waiting_ends_the_processes() -> None:
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        list(fork_map(lambda _i: time.sleep(60), 2, processes=2))
    assert time.monotonic() - t0 < 20
    assert not multiprocessing.active_children()


def test_a_process_that_dies_is_reported() -> None:
    def fn(i: int) -> int:
        if i == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
        return i

    with pytest.raises(BrokenProcessPool):
        list(fork_map(fn, 2, processes=2))
    assert not multiprocessing.active_children()
