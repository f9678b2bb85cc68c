"""Files stage: inbox → claim → parse → store, and finished files → manifest + done/.

Runs in its own thread with its own store connection. Every accepted line ends in the
store as pending, failed with a reason, or done — a cache hit, answered as its chunk is
parsed (``answer``: its WAV placed and fsynced first) — before the file counts as
queued; a crash mid-way re-parses the owned copy (inserts are idempotent on (file, line
number), and a hit's WAV placed before the crash is found again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ttsd import crash
from ttsd.cache import key_prefix, key_with, line_format
from ttsd.config import Config, InputConfig
from ttsd.errors import ConfigError, InputError
from ttsd.ingest.inbox import Claimed, Inbox, Rejected
from ttsd.ingest.names import display_name, name_key, safe_stem
from ttsd.ingest.parse import parse
from ttsd.ingest.text import ParseLimits
from ttsd.ingest.watch import writer_open
from ttsd.jobs import Job, JobError, VoiceFacts, resolve
from ttsd.log import get_logger
from ttsd.markup.lexicon import LexiconError, LexiconFile
from ttsd.markup.ssml import MarkupError, MarkupOptions, is_markup
from ttsd.markup.ssml import parse as parse_markup
from ttsd.output.dispose import dispose
from ttsd.output.formats import SUFFIX
from ttsd.output.fsio import Folder
from ttsd.output.join import Part, join_lines
from ttsd.output.manifest import ManifestRow, write_manifest
from ttsd.output.timestamps import sidecar
from ttsd.records import Line, LineError
from ttsd.store.journal import NewLine, Store, sqlite_ino

log = get_logger(__name__)
CHUNK = 1000
"""Lines inserted per store transaction while a file is parsed."""
FIRST_CHUNK = 256
"""A file's first chunk is smaller, so the feeder starts on its first lines while the
rest is parsed: half the GPU's default batch (``batching.idle_batch`` of 512, the
first batch of a burst), ready after about a tenth of a 2,000-line file's parse."""


NAME_REUSE_S = 60.0
"""A file claimed this soon after another of the same name is logged as a name reused
(``file.name_reused``): most likely a program that reopened the file to append."""

KEY_PREFIXES = 256
"""Prefix hashes ``Ingest`` keeps (a CSV may give every line its own speed)."""


class Ingest:
    def __init__(self, cfg: Config, voices: dict[str, VoiceFacts],
                 stop: threading.Event, *, fmt: str) -> None:
        self.cfg = cfg
        self.voices = voices
        self.stop = stop
        self.fmt = fmt
        self.suffix = SUFFIX[cfg.output.format]
        self.limits = ParseLimits.from_config(cfg.input)
        try:
            self._lexicon_file = LexiconFile(Path(cfg.input.lexicon) if cfg.input.lexicon
                                             else None)
        except LexiconError as exc:
            raise ConfigError(f"input.lexicon: {exc}") from None
        self.lexicon = self._lexicon_file.lexicon
        self.markup = MarkupOptions.from_config(cfg)
        self.inbox = Inbox(cfg.paths.inbox, cfg.paths.work, cfg.input)
        self.failed_files = 0
        self.finished_files = 0
        self.on_lines: Callable[[], None] | None = None
        """Called after each chunk of new lines is in the store (wakes the feeder)."""
        self.answer: Callable[[Store, list[NewLine], Path], None] | None = None
        """Answers a chunk's cache hits before it is inserted (``cache.answer_new_lines``:
        places their WAVs and marks those lines done); None: no cache."""
        self.on_answered: Callable[[int], None] | None = None
        """Called with how many lines of a chunk went into the store done (answered)."""
        self.resume = False
        """A step was cut off by a fault of the machine: the next one first runs
        ``recover`` (files left parsing, claimed copies with no row)."""
        self.in_hand = 0
        """Claims begun and not yet in the store (or disposed of): a file in between has
        left the inbox's watch list without a row yet (``run --once`` waits for it)."""
        self._prefixes: dict[tuple, tuple[VoiceFacts, Any]] = {}
        """(voice, speaker, scales) → (their VoiceFacts, the hash of their key prefix)."""
        self._writing: set[int] = set()
        """Files whose claimed copy a writer still had open at their finish (logged once)."""

    def use_input(self, cfg: InputConfig) -> None:
        """New [input] settings (a SIGHUP): the limits of files parsed from now on, and
        the inbox's settle time, rescan interval and back-pressure, and the lexicon a
        changed ``lexicon`` names (one that cannot be used is logged, the last kept)."""
        if cfg.lexicon != self.cfg.input.lexicon and \
                not self._lexicon_file.use(Path(cfg.lexicon) if cfg.lexicon else None):
            cfg = dataclasses.replace(cfg, lexicon=self.cfg.input.lexicon)
        self.cfg = dataclasses.replace(self.cfg, input=cfg)
        self.limits = ParseLimits.from_config(cfg)
        self.inbox.use(cfg)

    # ------------------------------------------------------------------ loop

    def recover(self, store: Store) -> None:
        """At start: re-parse files cut off mid-parse; adopt orphans of the work folder."""
        for row in store.files_in("parsing"):
            path = Path(row["work_path"])
            if not path.exists():
                store.fail_file(row["id"], "the claimed copy vanished before it was parsed")
                continue
            claimed = Claimed(row["name"], path, row["size"], row["sha256"], path.stat().st_mtime)
            self._parse_into(store, row["id"], claimed, Path(row["out_dir"]))
        known = store.work_paths()
        for path in self.inbox.orphans():
            if str(path) not in known:
                got = self.inbox.adopt(path)
                if got is not None:
                    self._accept(store, got)

    def step(self, store: Store) -> int:
        """One pass: claim what is ready (unless back-pressured), finish what is done."""
        n = 0
        if store.pending_count() < self.cfg.input.max_pending_lines:
            for path in self.inbox.ready():
                if self.stop.is_set():
                    break
                self.in_hand += 1
                try:
                    got = self.inbox.claim(path)
                    if got is None:
                        continue
                    crash.point("after_claim")
                    self._accept(store, got)
                finally:
                    self.in_hand -= 1
                n += 1
                if store.pending_count() >= self.cfg.input.max_pending_lines:
                    log.info("inbox.backpressure", pending=store.pending_count())
                    break
        self.finish_ready(store)
        return n

    def _accept(self, store: Store, got: Claimed | Rejected) -> None:
        if isinstance(got, Rejected):
            self.failed_files += 1
            if got.path.parent == self.cfg.paths.inbox:   # could not even be moved out
                store.add_rejected(got.name, Path(display_name(str(got.path))), got.reason,
                                   None)
                log.error("file.rejected", name=got.name, reason=got.reason, moved_to=None)
                return
            dest = dispose(got.path, self.cfg.paths.failed, got.name, error=got.reason)
            store.add_rejected(got.name, got.path, got.reason, dest)
            log.warning("file.rejected", name=got.name, reason=got.reason, moved_to=str(dest))
            return
        again = store.recent_claims(got.name, time.time() - NAME_REUSE_S)
        out_dir = self._out_dir(store, got.name)
        file_id = store.add_file(got.name, got.path, got.size, got.sha256, out_dir,
                                 mtime_ns=got.mtime_ns or None, ino=got.ino or None)
        log.info("file.claimed", name=got.name, size=got.size, sha256=got.sha256[:12],
                 file_id=file_id)
        if again:
            log.warning("file.name_reused", name=got.name, out_dir=str(out_dir),
                        claimed_before=again, within_s=NAME_REUSE_S,
                        hint="a file of this name was taken moments ago; if a program appends "
                             "to it in pieces, each piece is a new file: have it write the whole "
                             "file under a temporary name (.name.tmp) and rename it into the "
                             "inbox")
        self._parse_into(store, file_id, got, out_dir)

    def _out_dir(self, store: Store, name: str) -> Path:
        stem = safe_stem(Path(name).stem or name, 1, 4)
        base = self.cfg.paths.outbox
        candidate, n = base / stem, 1
        while candidate.exists() or store.out_dir_taken(candidate):
            n += 1
            candidate = base / f"{stem}-{n}"
        return candidate

    def _parse_into(self, store: Store, file_id: int, claimed: Claimed, out_dir: Path) -> None:
        t0 = time.perf_counter()
        try:
            data = self.inbox.read(claimed)
            self.lexicon = self._lexicon_file.current()   # an edited file is read again
            parsed = parse(data, claimed.name, self.limits)
            del data
            width = max(4, len(str(parsed.total_lines)))
            seen: dict[str, tuple[int, str]] = {}
            chunk: list[NewLine] = []
            count = hits = 0
            for item in parsed:
                chunk.append(self._new_line(item, width, seen))
                count += 1
                if len(chunk) >= (CHUNK if count > FIRST_CHUNK else FIRST_CHUNK):
                    hits += self._add(store, file_id, claimed.name, chunk, out_dir)
                    chunk = []
            if chunk:
                hits += self._add(store, file_id, claimed.name, chunk, out_dir)
            store.file_parsed(file_id, parsed.kind, parsed.total_lines, parsed.note)
            log.info("file.parsed", name=claimed.name, lines=count, kind=parsed.kind,
                     note=parsed.note, answered_from_cache=hits,
                     ms=round((time.perf_counter() - t0) * 1000, 1))
        except InputError as exc:
            self._fail(store, file_id, claimed, exc.describe() if exc.file else
                       f"{claimed.name}: {exc.describe()}")

    def _add(self, store: Store, file_id: int, name: str, chunk: list[NewLine],
             out_dir: Path) -> int:
        """Insert a chunk (its cache hits answered first, done); returns those answered."""
        if self.answer is not None:
            self.answer(store, chunk, out_dir)
        answered = store.add_lines(file_id, chunk)
        for ln in chunk:
            if ln.error:
                log.warning("line.failed", file=name, line=ln.number, error=ln.error)
        if answered and self.on_answered is not None:
            self.on_answered(answered)
        if self.on_lines is not None and any(ln.wav is None and ln.error is None
                                             for ln in chunk):
            self.on_lines()   # pending lines for the feeder
        return answered

    def _fail(self, store: Store, file_id: int, claimed: Claimed, error: str) -> None:
        dest = dispose(claimed.path, self.cfg.paths.failed, claimed.name, error=error)
        store.fail_file(file_id, error, str(dest))
        self.failed_files += 1
        log.warning("file.failed", name=claimed.name, error=error, moved_to=str(dest))

    def _new_line(self, item: Line | LineError, width: int,
                  seen: dict[str, tuple[int, str]]) -> NewLine:
        if isinstance(item, LineError):
            return NewLine(item.number, item.text or "", item.id, error=item.message)
        out_name = safe_stem(item.id, item.number, width)
        key = name_key(out_name)
        if key in seen:
            number, taken = seen[key]
            return NewLine(item.number, item.text, item.id,
                           error=f"duplicate id {item.id or out_name!r}: line {number} already "
                                 f"writes {taken}{self.suffix}")
        seen[key] = (item.number, out_name)
        try:
            job = resolve(self.cfg.engine, self.voices, voice=item.voice, speaker=item.speaker,
                          speed=item.speed)
        except JobError as exc:
            return NewLine(item.number, item.text, item.id, error=str(exc))
        markup = item.markup if item.markup is not None else \
            is_markup(item.text, self.cfg.input.markup == "ssml")
        said = self.lexicon.apply(item.text, markup, job.voice.name)
        if markup:
            try:
                for warning in parse_markup(said, self.markup).warnings:
                    log.warning("line.markup", line=item.number, warning=warning)
            except MarkupError as exc:
                return NewLine(item.number, item.text, item.id, error=f"markup: {exc}")
        key_c = self._cache_key(said, job, line_format(
            self.fmt, item.volume, item.pause_after, self.markup.key() if markup else ""))
        return NewLine(item.number, item.text, item.id, out_name, key, job.voice.name,
                       job.speaker_id, job.length_scale, job.noise_scale, job.noise_w, job.seed,
                       key_c, chapter=item.chapter, volume=item.volume,
                       pause_after=item.pause_after, markup=markup,
                       said=said if said != item.text else None)

    def _cache_key(self, text: str, job: Job, fmt: str | None = None) -> str:
        """``cache_key`` of a line, from the prefix's hash kept for its voice and
        parameters: 2,000 keys 14.5 → 7.5 ms (medians of 30 on 2 x86 cores; best 7.0 →
        3.8 ms). The table is keyed on the numbers' reprs, not their values: 0.0 and
        -0.0, or 1 and 1.0, are equal but give ``key_prefix`` different text. ``fmt``:
        the line's audio format (``line_format``; None: ``self.fmt``)."""
        fmt = self.fmt if fmt is None else fmt
        params = (job.voice.name, job.speaker_id, repr(job.length_scale),
                  repr(job.noise_scale), repr(job.noise_w), fmt)
        kept = self._prefixes.get(params)
        if kept is None or kept[0] is not job.voice:
            if len(self._prefixes) >= KEY_PREFIXES:
                self._prefixes.clear()
            kept = self._prefixes[params] = (job.voice, hashlib.sha256(
                key_prefix(job, fmt)))
        return key_with(kept[1], text)

    # ------------------------------------------------------------------ finishing

    def _since_claim(self, row: dict) -> str | None:
        """What happened to a file's claimed copy since it was claimed: None (nothing),
        "writing" (a process has it open for writing, or it changed less than
        ``settle_s`` ago), "grown" (written to since, maybe only appended), or how it
        changed otherwise, in words. A file claimed before the store kept its stamp is
        compared on its size only."""
        work = Path(row["work_path"])
        try:
            st = os.lstat(work)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        stamp = row.get("mtime_ns")
        if st.st_size == row["size"] and (stamp is None or (
                st.st_mtime_ns == stamp and sqlite_ino(st.st_ino) == row.get("ino"))):
            return None
        if writer_open(work) or time.time() - st.st_mtime < self.cfg.input.settle_s:
            if row["id"] not in self._writing:
                self._writing.add(row["id"])
                log.info("file.still_being_written", name=row["name"], size=st.st_size,
                         claimed_size=row["size"])
            return "writing"
        self._writing.discard(row["id"])
        if st.st_size > row["size"]:
            return "grown"
        if st.st_size < row["size"]:
            return f"it was {row['size']} bytes and is now {st.st_size}"
        return "its bytes were rewritten in place"

    def _grow(self, store: Store, row: dict) -> str | None:
        """A claimed copy that grew: when its old bytes are still there, unchanged, and
        ended with a line break, the lines after them are taken too (the file is parsed
        again; the lines it already had stay as they are) and None is returned.
        Otherwise how it changed, in words."""
        work = Path(row["work_path"])
        got = self.inbox.adopt(work, row["name"])
        if not isinstance(got, Claimed):
            return "it can no longer be read" if got is None else got.reason
        why = self.inbox.appended(got, row["size"], row["sha256"])
        if why is not None:
            return why
        log.info("file.grew", name=row["name"], size=got.size, claimed_size=row["size"])
        store.file_grown(row["id"], got.size, got.sha256, got.mtime_ns, got.ino)
        self._parse_into(store, row["id"], got, Path(row["out_dir"]))
        return None

    def finish_ready(self, store: Store) -> None:
        for row in store.finishable_files():
            self._finish(store, row)

    def _finish(self, store: Store, row: dict) -> None:
        change = self._since_claim(row)
        if change == "writing":
            return   # a writer still has the claimed copy open: finish once it is done
        if change == "grown":
            change = self._grow(store, row)
            if change is None:
                return   # parsed again: its new lines are in the queue
        error = None
        if change is not None:
            error = (f"{row['name']} changed after ttsd took it ({change}): was it still being "
                     "written? The lines already spoken stay in the outbox and its manifest; "
                     "write the whole file under a temporary name (.name.tmp), rename it into "
                     "the inbox, and drop it again for the rest")
        out_dir = Path(row["out_dir"])
        counts = store.file_counts(row["id"])
        if self.cfg.output.manifest:   # every file gets one, an empty file a header only
            with Folder.open(out_dir) as folder:
                write_manifest(folder, (
                    ManifestRow(id=r["line_id"] or "", line=r["number"], text=r["text"],
                                wav=os.path.basename(r["wav"] or "") if r["state"] == "done"
                                else "",
                                seconds=r["seconds"], cached=bool(r["cached"]),
                                error=r["error"] or "", sample_rate=r["rate"],
                                lufs=r["lufs"], timestamps=(
                                    os.path.basename(stamps) if (stamps := self._stamps(r))
                                    and os.path.exists(stamps) else ""),
                                markup=bool(r["markup"]), said=r["said"] or "")
                    for r in store.manifest_rows(row["id"])))
        if self.cfg.output.join == "file" and error is None:
            self._join(store, row, out_dir)
        work = Path(row["work_path"])
        if error is not None:
            dest = dispose(work, self.cfg.paths.failed, row["name"], error=error)
            store.fail_file(row["id"], error, str(dest))
            self.failed_files += 1
            log.warning("file.failed", name=row["name"], error=error, moved_to=str(dest))
            return
        if work.exists() or work.is_symlink():
            dest = dispose(work, self.cfg.paths.done, row["name"])
            store.set_dest(row["id"], str(dest))
        else:
            log.warning("file.input_gone", name=row["name"], work_path=str(work),
                        reason="its claimed copy was removed from the work folder; its lines "
                               "are finished, nothing moves to done/")
        store.finish_file(row["id"])
        self.finished_files += 1
        info = {"name": row["name"], "done": counts.get("done", 0),
                "failed": counts.get("failed", 0), "out_dir": str(out_dir)}
        log.info("file.done", note=row["note"], **info)

    def _stamps(self, r: dict) -> str | None:
        """A done line's timestamps file, where ``output.timestamps`` would have written
        it (None: not a done line, or no timestamps asked for)."""
        if r["state"] != "done" or not r["wav"] or not self.cfg.output.timestamps:
            return None
        return sidecar(r["wav"])

    def _join(self, store: Store, row: dict, out_dir: Path) -> None:
        """The input's lines as one audio file beside its folder (``output.join``)."""
        parts = (Part(r["number"], r["wav"] if r["state"] == "done" else None, r["text"],
                      r["line_id"] or f"Line {r['number']}", r.get("chapter"),
                      self._stamps(r))   # read only for a long line; a missing one: one cue
                 for r in store.manifest_rows(row["id"]))
        join_lines(out_dir.parent, out_dir.name, parts, self.cfg.output,
                   title=Path(row["name"]).stem)
