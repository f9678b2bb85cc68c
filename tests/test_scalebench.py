"""`ttsd bench --devices … --end-to-end`: the scaling table over 1..N devices (README,
"Several GPUs and clusters"), exercised on two CPU workers with the fast stand-in model.
Slow: it starts three worker processes and two daemons."""

from __future__ import annotations

import pytest

from ttsd.bench import scale as scalebench
from ttsd.config import Config


@pytest.mark.slow
def test_scaling_table_model_and_end_to_end(monkeypatch):
    monkeypatch.setenv("TTSD_MODEL", "tone")
    report = scalebench.run(Config(), "cpu,cpu", lines=12, end_to_end=True)
    assert [r["devices"] for r in report["rows"]] == [1, 2]
    assert all(r["x_realtime"] > 0 and sum(r["batches"]) == 12 for r in report["rows"])
    e2e = report["end_to_end"]
    assert [r["devices"] for r in e2e] == [1, 2]
    for r in e2e:   # every line became a WAV through the daemon, which exited cleanly
        assert r["rc"] == 0 and r["wavs"] == r["lines"] == 12, r
        assert r["x_realtime"] > 0
    assert e2e[0]["efficiency"] == pytest.approx(1.0)
    assert "end to end" in scalebench.render(report)


def test_devices_bench_writes_out_file(monkeypatch, tmp_path, capsys):
    """`--out PATH` keeps the report also for `--devices` (it was printed only, and a run
    whose output went elsewhere lost it)."""
    import json

    import structlog

    from ttsd import cli

    monkeypatch.setenv("TTSD_MODEL", "tone")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "scale.json"
    saved = structlog.get_config()   # cli.main points the logger at this test's stderr
    try:
        assert cli.main(["bench", "--devices", "cpu", "--lines", "2", "--out", str(out)]) == 0
    finally:
        structlog.configure(**saved)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["devices"] == ["cpu"] and report["rows"][0]["batches"] == [2]
    assert "x-realtime" in capsys.readouterr().out
