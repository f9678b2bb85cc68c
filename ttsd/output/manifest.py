"""manifest.csv: one row per line of an input (id, line, text, wav, seconds, cached,
error), written atomically into the input's output folder."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass

from ttsd.ingest.names import csv_cell
from ttsd.log import get_logger
from ttsd.output.fsio import Folder, write_atomic

log = get_logger(__name__)

MANIFEST_COLUMNS = ("id", "line", "text", "wav", "seconds", "cached", "error")


MANIFEST = "manifest.csv"


@dataclass(frozen=True)
class ManifestRow:
    """One line of ``manifest.csv``."""

    id: str
    line: int
    text: str
    wav: str
    """WAV file name relative to the manifest's folder ('' when the line failed)."""
    seconds: float | None
    cached: bool
    error: str


def manifest_bytes(rows: Iterable[ManifestRow]) -> bytes:
    """The manifest as UTF-8 CSV (RFC 4180: CRLF records, so a CR or LF inside a cell is
    always quoted)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(MANIFEST_COLUMNS)
    for r in rows:
        writer.writerow([
            csv_cell(r.id), r.line, csv_cell(r.text), csv_cell(r.wav),
            "" if r.seconds is None else f"{r.seconds:.3f}",
            "true" if r.cached else "false", csv_cell(r.error),
        ])
    return out.getvalue().encode("utf-8")


def write_manifest(folder: Folder, rows: Iterable[ManifestRow]) -> None:
    """Write (or atomically replace) ``manifest.csv`` in ``folder``. An OSError names
    the manifest's full path (the write itself goes through the folder's descriptor)."""
    try:
        write_atomic(MANIFEST, manifest_bytes(rows), overwrite=True, dir_fd=folder.fd)
    except OSError as exc:
        exc.filename, exc.filename2 = str(folder.path / MANIFEST), None
        raise
    log.debug("writer.manifest", folder=str(folder.path))
