"""ttsd: a batch text-to-speech daemon (inbox of text/CSV files → outbox of WAVs)."""

from __future__ import annotations

__version__ = "0.1.0"
