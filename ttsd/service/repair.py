"""``ttsd repair-store``: rebuild a damaged journal (``state/ttsd.db``) from the rows
SQLite can still read of it.

Nothing is deleted. With the state folder's lock held (no daemon can start meanwhile),
SQLite's ``quick_check`` says whether the journal is damaged at all; a sound journal is
left alone. A fresh journal is built beside the damaged one (``ttsd.db.rebuilding``),
then the damaged file, with its ``-wal`` and ``-shm``, is renamed aside to
``ttsd.db.damaged-YYYYmmdd-HHMMSS`` and the fresh one takes its name.

What is carried over and how is ``store.salvage``'s. When lines were lost, each
unfinished file whose claimed copy is still in the work folder goes back to
``parsing``: at the next start ``Ingest.recover`` parses the copy again. Its inserts
are idempotent on (file, line number), so only the lost lines come back, as pending. A
WAV already in the outbox is never written again: a lost line whose cache entry
survived is answered from the cache as it is parsed (``cache.place_hit`` counts the
cache's bytes already at the path as placed), and any other goes through the model once
more, after which the sink keeps the valid WAV it finds at the path instead of writing
it (``Sink._write_one``). A claimed copy whose file row was lost is adopted as a new file
at the next start (``Inbox.orphans``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ttsd.config import PathsConfig
from ttsd.errors import TtsdError
from ttsd.log import get_logger
from ttsd.service import sitelock
from ttsd.store.salvage import NOT_CARRIED, Salvage, TableTally, check, salvage

log = get_logger(__name__)

SIDE_FILES = ("", "-wal", "-shm")
"""A journal on disk: the database and SQLite's write-ahead log and its index."""


class JournalInUseError(TtsdError):
    """A daemon holds the state folder: the journal it writes is not rebuilt under it."""

    exit_status = sitelock.EXIT_LOCKED


@dataclass
class RepairReport:
    db: str
    dry_run: bool = False
    problem: str | None = None
    """What SQLite's check found; None: the journal is sound (or missing)."""
    missing: bool = False
    rebuilt: bool = False
    damaged_copy: str | None = None
    """Where the damaged journal was (or, in a dry run, would be) kept."""
    salvage: Salvage = field(default_factory=Salvage)
    """What the rebuild carried over (empty when there was none)."""
    orphan_copies: int = 0
    """Claimed inputs in the work folder that no salvaged file row names."""

    def table(self, name: str) -> TableTally:
        return self.salvage.table(name)


# ---------------------------------------------------------------------- repair

def repair(paths: PathsConfig, *, dry_run: bool = False, force: bool = False,
           now: float | None = None) -> RepairReport:
    """Check the journal and, if SQLite finds it damaged (or ``force``), rebuild it from
    what can be read, keeping the damaged copy. ``dry_run`` builds the new journal in a
    temporary folder, reports, and changes nothing. JournalInUseError (exit 3) if a
    daemon holds the state folder."""
    db = paths.db
    report = RepairReport(str(db), dry_run=dry_run)
    if not db.exists():
        report.missing = True
        return report
    with contextlib.ExitStack() as stack:
        if not dry_run:   # a dry run only reads: safe beside a daemon
            stack.enter_context(_hold(paths.state))
        report.problem = check(db)
        if report.problem is None and not force:
            return report
        copy = _aside_name(db, time.time() if now is None else now)
        report.damaged_copy = str(copy)
        if dry_run:
            target = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="ttsd-repair-"))) / db.name
        else:
            target = db.with_name(db.name + ".rebuilding")
            _remove(target)   # left by a repair that was cut short
        try:
            _rebuild(db, target, paths, report)
        except BaseException:
            _remove(target)   # the damaged journal is still in place, as it was
            raise
        if dry_run:
            return report
        _rename(db, copy)
        _rename(target, db)
        _sync_folder(db.parent)
        report.rebuilt = True
    log.warning("store.repaired", db=str(db), damaged_copy=report.damaged_copy,
                problem=report.problem,
                **{f"{t.name}_salvaged": t.salvaged for t in report.salvage.tables},
                **{f"{t.name}_lost": t.lost for t in report.salvage.tables})
    return report


@contextlib.contextmanager
def _hold(state: Path) -> Iterator[None]:
    """The state folder's lock (``sitelock``), held while the journal is rebuilt."""
    try:
        fd = sitelock.acquire(state)
    except sitelock.SiteLockedError as exc:
        who = f"pid {exc.pid}" if exc.pid else "a process whose pid is not written yet"
        raise JournalInUseError(
            f"a ttsd daemon ({who}) holds the state folder {state}: stop it first "
            "(systemctl stop ttsd); repair-store never rebuilds a journal in use") from None
    try:
        yield
    finally:
        os.close(fd)



def _rebuild(src: Path, target: Path, paths: PathsConfig, report: RepairReport) -> None:
    """The fresh journal at ``target``, and the claimed copies no salvaged row names."""
    report.salvage = salvage(src, target)
    known = report.salvage.work_paths
    with contextlib.suppress(FileNotFoundError), os.scandir(paths.work) as it:
        report.orphan_copies = sum(1 for e in it if e.path not in known)


# ---------------------------------------------------------------------- files

def _aside_name(db: Path, now: float) -> Path:
    """``ttsd.db.damaged-YYYYmmdd-HHMMSS`` (``-2``, ``-3``… if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    base = db.with_name(f"{db.name}.damaged-{stamp}")
    copy, n = base, 1
    while any(os.path.lexists(f"{copy}{s}") for s in SIDE_FILES):
        n += 1
        copy = base.with_name(f"{base.name}-{n}")
    return copy


def _rename(src: Path, dst: Path) -> None:
    """A journal with its side files, renamed."""
    for side in SIDE_FILES:
        if os.path.lexists(f"{src}{side}"):
            os.rename(f"{src}{side}", f"{dst}{side}")


def _remove(db: Path) -> None:
    for side in SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{db}{side}")


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)




# ---------------------------------------------------------------------- render

def render(report: RepairReport) -> str:
    """What was found, kept, carried over and lost, for a terminal."""
    if report.missing:
        return f"no journal at {report.db}: nothing to repair"
    if report.problem is None and not report.salvage.tables:
        return (f"the journal {report.db} passed SQLite's quick_check: nothing to repair "
                "(--force rebuilds it anyway)")
    would, got = report.dry_run, report.salvage
    out = [f"the journal {report.db} is damaged: {report.problem}" if report.problem
           else f"the journal {report.db} passed SQLite's quick_check (rebuilt: --force)"]
    out.append(f"{'would keep' if would else 'kept'} the damaged copy as "
               f"{report.damaged_copy} (nothing is deleted)")
    out.append(f"{'would rebuild' if would else 'rebuilt'} {report.db} from what SQLite "
               "could read:")
    for t in got.tables:
        out.append(f"  {t.name:9} {_tally(t)}")
    out.append(f"  not carried over: {', '.join(NOT_CARRIED)} (throughput history and live "
               "facts; they fill again as the daemon runs)")
    notes = []
    if got.requeued:
        notes.append(f"pending again: {_count(got.requeued, 'line')} left in flight")
    if got.orphan_lines:
        notes.append(f"dropped: {_count(got.orphan_lines, 'line')} whose file row was lost")
    if got.reparse:
        notes.append(
            f"back to parsing: {_count(len(got.reparse), 'unfinished file')} "
            f"({_names(got.reparse)}). At the next start ttsd reads the claimed copy "
            "again and adds back only the lost lines; a WAV already in the outbox is kept, "
            "never written again")
    if got.cut_short:
        notes.append(
            f"cut short: {_count(len(got.cut_short), 'unfinished file')} "
            f"({_names(got.cut_short)}) may have lost lines and no claimed copy is left "
            "to read again: drop the file into the inbox again for the missing lines")
    lines = next((t for t in got.tables if t.name == "lines"), None)
    if lines is not None and lines.lost != 0 and got.finished_files:
        notes.append("lost lines of finished files stay lost to the journal: their WAVs and "
                     "manifest.csv stay in the outbox, but ttsd status no longer counts them")
    if report.orphan_copies:
        notes.append(
            f"no file row: {_count(report.orphan_copies, 'claimed input')} in the work "
            "folder. The next start takes each as a new file (its WAVs go to a new outbox "
            "folder)")
    out.extend(f"  {n}" for n in notes)
    out.append("dry run: nothing was changed" if would else
               "start ttsd again (systemctl start ttsd, or ttsd run)")
    return "\n".join(out)


def _tally(t: TableTally) -> str:
    if t.error:
        return f"none salvaged ({t.error})"
    lost = "? lost (could not be counted)" if t.lost is None else f"{t.lost:,} lost"
    text = f"{t.salvaged:,} salvaged, {lost}"
    where = [_gap(g) for g in t.gaps[:3]]
    if len(t.gaps) > 3:
        where.append(f"{len(t.gaps) - 3:,} more")
    if where:
        text += f"; unreadable {', '.join(where)}"
    if t.name == "counters":
        text += "; the done totals recounted from the salvaged lines"
    return text


def _gap(gap: tuple[int | None, int | None]) -> str:
    before, after = gap
    if before is None and after is None:
        return "throughout"
    if before is None:
        return f"before row {after}"
    if after is None:
        return f"after row {before}"
    return f"between rows {before} and {after}"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5:,} more" if len(names) > 5 else "")

