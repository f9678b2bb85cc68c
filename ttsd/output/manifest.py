"""manifest.csv: one row per line of an input (id, line, text, wav, seconds, cached,
error, format, sample_rate, lufs, timestamps, markup, said), written atomically into the
input's output folder."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass

from ttsd.ingest.names import csv_cell
from ttsd.log import get_logger
from ttsd.output.fsio import Folder, write_atomic

log = get_logger(__name__)

MANIFEST_COLUMNS = ("id", "line", "text", "wav", "seconds", "cached", "error", "format",
                    "sample_rate", "lufs", "timestamps", "markup", "said")
"""The first seven as they always were; the audio's own after them, then how the text
was read: ``markup`` "ssml" or empty, ``said`` the text after the lexicon when it
changed it. ``wav`` names the line's file whatever its format (its suffix says which)."""


MANIFEST = "manifest.csv"


@dataclass(frozen=True)
class ManifestRow:
    """One line of ``manifest.csv``."""

    id: str
    line: int
    text: str
    wav: str
    """The line's file name relative to the manifest's folder ('' when the line failed)."""
    seconds: float | None
    cached: bool
    error: str
    sample_rate: int | None = None
    lufs: float | None = None
    """Integrated loudness measured after rendering (with ``output.loudness_lufs``)."""
    timestamps: str = ""
    """The line's timestamps file (``output.timestamps``), relative like ``wav``."""
    markup: bool = False
    said: str = ""


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
            r.wav.rsplit(".", 1)[-1].lower() if "." in r.wav else "",
            r.sample_rate or "", "" if r.lufs is None else f"{r.lufs:.2f}",
            csv_cell(r.timestamps), "ssml" if r.markup else "", csv_cell(r.said),
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
