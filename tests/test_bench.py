"""`ttsd bench --end-to-end --e2e-compare SECTION.KEY=VALUE`: an A/B row is the real
daemon with one config value changed. An engine key once made every such row fail (the
bench's own [engine] section was declared twice), and the bench crashed on the row."""

from __future__ import annotations

import tomllib

from ttsd.bench import corpus, e2e
from ttsd.config import Config


def test_compare_pairs_override_the_base_sections() -> None:
    text = e2e.toml_text("engine.compile=\"off\",batching.writer_threads=2,engine.dtype=\"float32\"",
                        {"engine": {"device": '"cpu"', "dtype": '"bfloat16"'},
                        "input": {"settle_s": "0.0"}})
    assert tomllib.loads(text) == {
        "engine": {"device": "cpu", "dtype": "float32", "compile": "off"},
        "input": {"settle_s": 0.0}, "batching": {"writer_threads": 2}}


def test_end_to_end_compare_row_of_an_engine_key(monkeypatch) -> None:
    monkeypatch.setenv("TTSD_MODEL", "tone")   # the stand-in model: the daemon is tested
    lines = corpus.bench_lines(6)
    row = e2e.bench_end_to_end(Config(), lines, "float32", cache_run=False,
                               compare='engine.compile="off",batching.writer_threads=2')
    run = row["synthesize"]
    assert run["rc"] == 0 and run["wavs"] == run["lines"] == 6, run
    assert run["x_realtime_claim_to_last_wav"] > 0
    # The timeline accounts for every synthesized line, batch by batch, in order.
    timeline = run["timeline"]
    assert sum(b[1] for b in timeline) == 6, timeline
    assert all(0 < b[0] <= run["claim_to_last_wav_s"] + 0.01 for b in timeline), timeline
    assert [b[0] for b in timeline] == sorted(b[0] for b in timeline)
