"""The CUDA graphs' padding. Text half: padding a batch to its bucket shape (extra rows
repeating row 0, extra masked tokens) leaves the real rows' outputs as they are eager.
Audio half: a call's inputs in the graph's shared buffers (tokens padded to the frames,
with no frames) give the audio of the call made eagerly.

Capturing needs a GPU (the bench's quality and batched-vs-alone rows check it there,
and ``test_audio_graphs_replay_the_compiled_audio`` where one is present); the padding
the graphs rely on is the same code on the CPU and is checked here with the real
voice."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ttsd.engine.device import configure_process
from ttsd.engine.graphs import (
    MAX_ROWS,
    MAX_TOKENS,
    TOKEN_STEP,
    AudioGraphs,
    TextGraphs,
    batch_bucket,
    pad_inputs,
    token_bucket,
)
from ttsd.engine.options import EngineOptions
from ttsd.engine.packing import FRAME_STEP, bucket
from ttsd.engine.phonemes import Phonemizer
from ttsd.engine.records import Request
from ttsd.engine.runtime import Engine
from ttsd.engine.voice import load_model, package_voice

TEXTS = ["Hello there.", "A somewhat longer sentence, with a comma in it.",
         "Numbers like 42 and 1999 are read out.", "Short one."]


def test_buckets() -> None:
    assert [batch_bucket(b, 128) for b in (1, 2, 3, 5, 64, 65, 128)] == \
        [1, 2, 4, 8, 64, 128, 128]
    assert batch_bucket(70, 96) == 96 and batch_bucket(3, 3) == 3
    assert [token_bucket(t) for t in (1, 64, 65, 512)] == [64, 64, 128, 512]
    g = TextGraphs(lambda *a: a, torch.device("cpu"), 128)
    shapes = g.shapes()
    assert shapes[0] == (MAX_ROWS, MAX_TOKENS) and (1, TOKEN_STEP) in shapes
    assert len(shapes) == 6 * (MAX_TOKENS // TOKEN_STEP)   # 1, 2, 4, 8, 16, 32 rows
    assert g.shape(20, 70) == (32, 128)
    assert g.shape(20, MAX_TOKENS + 1) is None, "longer sentences run eagerly"
    assert g.shape(MAX_ROWS + 1, 10) is None, "big batches run eagerly"
    assert TextGraphs(lambda *a: a, torch.device("cpu"), 12).shape(9, 10) == (12, 64)


def test_padded_bucket_gives_the_eager_rows() -> None:
    info = package_voice()
    model, _ = load_model(info)
    ph = Phonemizer(info.config)
    seqs = [ph.sentences(t)[0] for t in TEXTS]
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    inputs = (ids, torch.tensor([len(s) for s in seqs]), torch.zeros(len(seqs), dtype=torch.long),
              torch.tensor([11, 22, 33, 44]), torch.full((len(seqs),), 0.8),
              torch.tensor([1.0, 1.0, 1.3, 0.9]))
    fn = model.text_frames
    with torch.inference_mode():
        m, logs, dur, frames = fn(*inputs)
        padded = pad_inputs(inputs, 8, token_bucket(t))
        assert t % TOKEN_STEP, "the bucket adds masked tokens"
        assert padded[0].shape == (8, token_bucket(t))
        assert padded[1].tolist()[4:] == [len(seqs[0])] * 4
        pm, plogs, pdur, pframes = fn(*padded)
    assert torch.equal(pframes[:4], frames), "durations identical"
    assert torch.equal(pdur[:4, :t], dur) and not pdur[:4, t:].any()
    torch.testing.assert_close(pm[:4, :, :t], m, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plogs[:4, :, :t], logs, rtol=1e-4, atol=1e-5)
    assert torch.equal(pframes[4:], frames[:1].expand(4)), "extra rows repeat row 0"


def test_graphs_are_gpu_only() -> None:
    eng = Engine(EngineOptions(device="cpu", cuda_graphs="on"))
    assert not eng.tuning.cuda_graphs
    assert eng.capture_graphs(next(iter(eng.voices))) == (0, 0.0)


def _text_half(model, texts):
    ph = Phonemizer(package_voice().config)
    seqs = [ph.sentences(t)[0] for t in texts]
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    n = len(seqs)
    return model.text_frames(ids, torch.tensor([len(s) for s in seqs]),
                             torch.zeros(n, dtype=torch.long), torch.arange(n) + 5,
                             torch.full((n,), 0.8), torch.ones(n))


def test_audio_graph_inputs_give_the_eager_audio() -> None:
    model, _ = load_model(package_voice())
    a = model.args
    with torch.inference_mode():
        m, logs, dur, frames = _text_half(model, TEXTS)
        n, t = dur.shape
        fmax = bucket(int(frames.max()), FRAME_STEP)
        assert t < fmax, "the graph pads the tokens up to the frames"
        sid, seeds = torch.zeros(n, dtype=torch.long), torch.arange(n) + 7
        noise = torch.full((n,), 0.667)
        eager = model.audio_half(m, logs, dur, frames, fmax, sid, seeds, noise)
        graphs = AudioGraphs(model.audio_half, torch.device("cpu"), a.inter, a.hop,
                             max_rows=8, budget=8 * fmax)
        assert graphs.fits(n, fmax) and not graphs.fits(9, fmax)
        assert not graphs.fits(n, 8 * fmax), "over the frame budget: eager"
        gm, glogs, gdur, gframes, gsid, gseeds, gnoise = graphs.inputs(n, fmax)
        assert gm.shape == (n, a.inter, fmax) and gdur.shape == (n, fmax)
        gm.fill_(7.0)   # a previous call's leftovers: the engine zeroes before filling
        gdur.fill_(3)
        for x in (gm, glogs, gdur):
            x.zero_()
        gm[:, :, :t], glogs[:, :, :t], gdur[:, :t] = m, logs, dur
        for x, v in ((gframes, frames), (gsid, sid), (gseeds, seeds), (gnoise, noise)):
            x.copy_(v)
        out = graphs.output(n, fmax)
        out.copy_(model.audio_half(gm, glogs, gdur, gframes, fmax, gsid, gseeds, gnoise))
    assert out.shape == eager.shape == (n, fmax * a.hop)
    assert torch.equal(out, eager), "the graph's padded inputs change nothing"
    assert graphs.output(n, fmax).data_ptr() == graphs.output(1, 64).data_ptr(), \
        "one shared output buffer"
    graphs.close()
    assert not graphs.fits(n, fmax), "a closed engine's calls run eagerly"


def test_audio_graphs_are_gpu_only() -> None:
    eng = Engine(EngineOptions(device="cpu", audio_graphs="on"))
    assert not eng.tuning.audio_graphs
    assert eng.voice(next(iter(eng.voices))).audio_graphs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_audio_graphs_replay_the_compiled_audio() -> None:
    """On a GPU: the warm-up captures the audio half's call shapes, and a batch's audio
    from the graphs is the audio of the same batch without them, sample for sample."""
    options = EngineOptions(device="cuda", dtype="bfloat16", max_batch=16,
                            warmup_frames=512, row_step=4)
    configure_process(options)
    eng = Engine(options)
    name = next(iter(eng.voices))
    eng.warmup(name, sizes=(1,))
    lv = eng.voice(name)
    assert lv.audio_graphs is not None and lv.audio_graphs.graphs, lv.audio_graphs.off
    info = lv.info.inference
    texts = [f"{t} Take {i}." for i, t in enumerate(TEXTS * 3)]
    prepared = eng.prepare([Request(i, t, name, 0, info["length_scale"], info["noise_scale"],
                                    info["noise_w"], 0) for i, t in enumerate(texts)])
    on, _ = eng.run(prepared)
    graphs, lv.audio_graphs = lv.audio_graphs, None
    try:
        off, _ = eng.run(prepared)
    finally:
        lv.audio_graphs = graphs
    assert all(r.audio is not None for r in on)
    assert [r.audio.tolist() for r in on] == [r.audio.tolist() for r in off]
