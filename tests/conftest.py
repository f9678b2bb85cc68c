"""Make tests/ importable (harness.py, faults.py) and keep every converted voice in the
tests' own cache folder, for the engines built in the test process too (the daemons the
tests start run on the CPU by their config: ``harness.Site``)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import TEST_CACHE


@pytest.fixture(autouse=True, scope="session")
def _test_cache() -> Iterator[None]:
    """Engines built inside the test process (bench, workers, load tests) keep their
    converted voice where the daemons the tests start keep theirs (``TEST_CACHE``),
    never in the user's own ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(TEST_CACHE))
    yield
    mp.undo()


@pytest.fixture()
def frozen_heap() -> Iterator[None]:
    """For a test that bounds a wall time: the objects of every test before it frozen
    out of the cyclic collector, as the daemon freezes its heap at start (``gc.freeze``;
    ``ttsd status`` is a small process of its own). Late in a full run the test process
    holds ~555,000 objects whose full collection takes 0.42 s on a 2-core machine, long
    enough to push a status poll bounded at 1 s to 1.28 s (alone its worst is 12-50 ms)."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
