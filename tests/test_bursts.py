"""The writers' hand-off: a thread takes what the event loop put a burst at a time, within the
bounds, and nothing put is ever lost."""

from __future__ import annotations

import threading

from douane.bursts import Bursts
from tests.support.waiting import until


def test_a_burst_is_everything_put_within_the_bounds():
    bursts: Bursts[int] = Bursts(window=0, items=4, size=100)
    for i in range(10):
        bursts.put(i)
    assert [bursts.take() for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    for i, size in enumerate((30, 30, 50, 10, 200, 1)):
        bursts.put(i, size)
    # a burst stops at the item that reaches the byte bound; one item alone may be larger
    assert [bursts.take() for _ in range(3)] == [[0, 1, 2], [3, 4], [5]]
    assert len(bursts) == 0


def test_a_full_burst_is_taken_without_waiting_for_the_window():
    bursts: Bursts[int] = Bursts(window=3600, items=3)
    taken: list[list[int] | None] = []
    thread = threading.Thread(target=lambda: taken.append(bursts.take()))
    thread.start()
    for i in range(3):
        bursts.put(i)
    thread.join(60)
    assert not thread.is_alive() and taken == [[0, 1, 2]]


def test_close_hands_over_what_waits_then_ends():
    bursts: Bursts[int] = Bursts(window=3600)
    bursts.put(1)
    bursts.put(2)
    bursts.close()
    assert bursts.take() == [1, 2]
    assert bursts.take() is None
    waiting = Bursts[int](window=3600)
    taken: list[list[int] | None] = []
    thread = threading.Thread(target=lambda: taken.append(waiting.take()))
    thread.start()
    waiting.close()  # a thread waiting for a first item is let go
    thread.join(60)
    assert not thread.is_alive() and taken == [None]


def test_a_thread_idle_after_an_empty_window_is_woken_by_the_next_put():
    bursts: Bursts[int] = Bursts(window=0.001)
    taken: list[list[int] | None] = []
    thread = threading.Thread(target=lambda: taken.append(bursts.take()))
    thread.start()
    # the window passed with nothing: it waits for a put alone
    assert until(lambda: bursts._idle, 60)
    bursts.put(7)
    thread.join(60)
    assert not thread.is_alive() and taken == [[7]]
