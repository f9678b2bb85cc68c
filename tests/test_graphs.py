"""The text half's CUDA-graph buckets: padding a batch to its bucket shape (extra rows
repeating row 0, extra masked tokens) leaves the real rows' outputs as they are eager.

Capturing needs a GPU (the bench's quality and batched-vs-alone rows check it there);
the padding the graphs rely on is the same code on the CPU and is checked here with the
real voice."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ttsd.engine.graphs import (
    MAX_ROWS,
    MAX_TOKENS,
    TOKEN_STEP,
    TextGraphs,
    batch_bucket,
    pad_inputs,
    token_bucket,
)
from ttsd.engine.phonemes import Phonemizer
from ttsd.engine.runtime import Engine
from ttsd.engine.voice import discover, load_model, package_voice

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
    eng = Engine(discover(None), device="cpu", cuda_graphs="on")
    assert not eng.cuda_graphs
    assert eng.capture_graphs(next(iter(eng.voices))) == (0, 0.0)
