"""The back-off of a place that cannot be written: one round of failures (all the
writes of one batch) is one retry, not one per write."""

from __future__ import annotations

import threading

from ttsd.health import FIRST_RETRY_S, MAX_RETRY_S, Health


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_writes_of_one_round_count_as_one_failure() -> None:
    clock = Clock()
    health = Health(clock)
    for _ in range(9):   # a batch's writer threads all fail at once
        health.trouble("outbox", "/o/x", "No space left on device", "sink")
    b = health.blocked("outbox")
    assert b is not None and b.retries == 0
    assert b.next_try == clock.now + FIRST_RETRY_S
    assert not health.due("outbox")
    clock.now += FIRST_RETRY_S
    assert health.due("outbox")
    health.trouble("outbox", "/o/x", "No space left on device", "sink")   # the retry failed
    health.trouble("outbox", "/o/x", "No space left on device", "sink")
    assert health.blocked("outbox").retries == 1
    assert health.blocked("outbox").next_try == clock.now + 2 * FIRST_RETRY_S
    for _ in range(20):
        clock.now = health.blocked("outbox").next_try
        health.trouble("outbox", "/o/x", "No space left on device", "sink")
    assert health.blocked("outbox").next_try - clock.now == MAX_RETRY_S
    health.clear("outbox", "sink")
    assert health.blocked("outbox") is None


def test_a_place_is_clear_once_every_part_that_met_the_fault_has_written() -> None:
    health = Health(Clock())
    health.trouble("state", "/s/ttsd.db", "database or disk is full", "sink")
    health.trouble("state", "/s/ttsd.db", "database or disk is full", "heartbeat")
    health.clear("state", "heartbeat")
    assert health.blocked("state") is not None
    health.clear("state", "sink")
    assert health.blocked("state") is None
    assert health.retry("state", "/s/ttsd.db", lambda: None, threading.Event(), "feeder")


def test_a_probe_that_passes_lets_one_round_try_and_keeps_the_back_off() -> None:
    """A disk with room for the probe but not for the work: each failed trial is a
    failed retry (1, 2, 4 … s), never a fresh blockage retried after a second."""
    clock = Clock()
    health = Health(clock)
    health.trouble("outbox", "/o/x", "No space left on device", "sink")
    for retries in range(1, 5):
        clock.now = health.blocked("outbox").next_try
        assert health.due("outbox")
        health.start_trial("outbox")                 # the probe passed: one batch tries
        assert not health.due("outbox")              # …and only one
        health.trouble("outbox", "/o/x", "No space left on device", "sink")   # it fails
        b = health.blocked("outbox")
        assert b.retries == retries and not b.trial
        assert b.next_try - clock.now == FIRST_RETRY_S * 2 ** retries
    clock.now = health.blocked("outbox").next_try
    health.start_trial("outbox")
    health.clear("outbox", "sink")                   # the trial's writes went through
    assert health.blocked("outbox") is None
