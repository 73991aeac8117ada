"""MicroBatchFeed: a micro-batch's tiles are fetched when the schedule asks for it, at most
`prefetch` ahead, in order, each once; chunks after the first get the placeholder."""

import torch

from megatron_internvl.parallel.data import MicroBatchFeed


def _step(n):
    return [{"input_ids": torch.full((1, 4), m), "pixel_values": torch.full((m + 1, 3, 2, 2), m, dtype=torch.uint8)}
            for m in range(n)]


def test_tiles_are_fetched_when_asked_and_at_most_prefetch_ahead():
    for prefetch in (0, 1, 3):
        fetched = []

        def fetch(b):
            fetched.append(int(b["input_ids"][0, 0]))
            return b["pixel_values"].clone()

        feed = MicroBatchFeed(_step(5), fetch, prefetch)
        assert fetched == []  # nothing moves before the schedule asks
        for m, b in enumerate(feed.iterator(0)):
            assert fetched == list(range(min(5, m + 1 + prefetch)))
            assert torch.equal(b["pixel_values"], torch.full((m + 1, 3, 2, 2), m, dtype=torch.uint8))
            assert int(b["input_ids"][0, 0]) == m
            assert len(feed._ready) <= prefetch  # handed over: the feed holds only the ones ahead
        assert fetched == [0, 1, 2, 3, 4]


def test_later_chunks_get_the_tile_count_only():
    feed = MicroBatchFeed(_step(3), lambda b: b["pixel_values"], 1)
    later = list(feed.iterator(1))
    assert [tuple(b["pixel_values"].shape) for b in later] == [(1, 3, 0, 0), (2, 3, 0, 0), (3, 3, 0, 0)]
    assert feed._ready == {}  # the second chunk fetched nothing
