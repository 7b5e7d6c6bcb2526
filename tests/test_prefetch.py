"""features.prefetched: the decode-ahead thread of extract_features keeps order, passes errors on, and stops
when its consumer does."""

import threading

import pytest

from unseg.features import prefetched


def test_items_come_in_order_and_the_thread_ends():
    before = threading.active_count()
    assert list(prefetched(range(50), depth=2)) == list(range(50))
    assert threading.active_count() == before


def test_an_error_in_the_producer_is_raised_to_the_consumer_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise OSError("unreadable image")

    got = []
    with pytest.raises(OSError, match="unreadable image"):
        for x in prefetched(items()):
            got.append(x)
    assert got == [1, 2]


def test_a_consumer_that_stops_early_stops_the_producer():
    produced = []

    def items():
        for i in range(10_000):
            produced.append(i)
            yield i

    before = threading.active_count()
    it = prefetched(items(), depth=1)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert threading.active_count() == before
    assert len(produced) <= 6  # at most the queue and the item in hand beyond what was consumed
