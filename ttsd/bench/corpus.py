"""The bench's lines: varied, deterministic English sentences of everyday lengths."""

from __future__ import annotations

_SUBJECTS = ["The committee", "My neighbour", "A small robot", "The old lighthouse keeper",
             "Our train", "The quarterly report", "Doctor Alvarez", "The red fox"]


_VERBS = ["announced", "noticed", "explained", "forgot", "remembered", "measured", "painted"]


_OBJECTS = ["that the bridge would reopen on March 3rd", "a strange light over the harbour",
            "why 42 is not always the answer", "the price: $1,299.99, taxes included",
            "three hundred and twelve reasons to stay", "the difference between 7.5% and 75%",
            "an error at 10:45 p.m."]


_TAILS = ["", " Nobody was surprised.", " Was it worth it?", " What a day!",
          (" However, the data, which was collected over 18 months in 12 cities, told a "
           "different story; some said so, others did not."),
          " It rained; then it stopped, and then, quite suddenly, it began again."]


def bench_lines(n: int) -> list[str]:
    """A fixed, varied set of distinct English lines: short to long, one to three
    sentences, punctuation, numbers, in a shuffled (but fixed) order. Every line is
    different, so the daemon's de-duplication and cache do not flatter it (before
    2026-11-26 the set repeated 903 distinct lines)."""
    import random

    combos = [(s, v, o, t) for s in _SUBJECTS for v in _VERBS for o in _OBJECTS
              for t in _TAILS]
    random.Random(2026).shuffle(combos)
    out = []
    for i in range(n):
        if i % 11 == 0:
            out.append(["Yes, {}.", "Hello there, number {}!", "Line {}."][i % 3].format(i))
            continue
        s, v, o, t = combos[i % len(combos)]
        again = f" That was take {i // len(combos) + 1}." if i >= len(combos) else ""
        out.append(f"{s} {v} {o}.{t}{again}")
    return out
