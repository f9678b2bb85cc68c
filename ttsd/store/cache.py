"""The cache table: one row per cached WAV (its key, file, size, audio, use).

The daemon reads hits by key and stamps the files it verified; ``purge-cache`` walks
the rows least recently used first and evicts them a page at a time.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable

from ttsd.store.base import StoreBase, add_counters
from ttsd.store.records import CacheEntry, CacheFile, CacheTotals

_HIT_NAMES = ("key", "path", "bytes", "seconds", "ino", "mtime_ns", "rate", "lufs")
_HIT_COLUMNS = ", ".join(_HIT_NAMES)
_ENTRY_COLUMNS = "key, path, bytes, last_used, hits, rowid"


def count_hits(c: sqlite3.Connection, keys: Iterable[str], now: float) -> None:
    """The cache entries' use (a key used twice counts twice) and the cache_hits counter.
    Keys used once each (the usual case) skip the GROUP BY: 2,000 keys 5.7-7.8 → 4.5-4.9
    ms."""
    keys = list(keys)
    if len(set(keys)) == len(keys):
        c.execute("UPDATE cache SET hits = hits + 1, last_used = ? "
                  "WHERE key IN (SELECT value FROM json_each(?))", (now, json.dumps(keys)))
    else:
        c.execute("UPDATE cache SET hits = hits + j.n, last_used = ? FROM "
                  "(SELECT value AS key, COUNT(*) AS n FROM json_each(?) GROUP BY value)"
                  " AS j WHERE cache.key = j.key", (now, json.dumps(keys)))
    add_counters(c, (("cache_hits", len(keys)),))


class CacheTable(StoreBase):
    """The cache rows: hits, stamps, evictions, and the walk ``purge-cache`` takes."""

    def cache_get_many(self, keys: list[str]) -> dict[str, dict]:
        """The cache rows a hit needs (key, path, bytes, seconds, ino, mtime_ns) by key,
        for many keys in one query (the keys as one JSON array: 1,024 keys, 2.4 → 1.8 ms
        against one ``IN (?, …)`` query per 500; these six columns instead of all ten:
        2,000 keys 8.3 → 6.3 ms)."""
        if not keys:
            return {}
        cur = self.conn.execute(f"SELECT {_HIT_COLUMNS} FROM cache WHERE key IN "
                                "(SELECT value FROM json_each(?))",
                                (json.dumps(list(dict.fromkeys(keys))),))
        return {row[0]: dict(zip(_HIT_NAMES, row)) for row in cur}

    def cache_stamp(self, stamps: list[tuple[str, int, int]]) -> None:
        """(key, inode, mtime_ns) of cache files whose header was just checked."""
        with self.tx() as c:
            c.executemany("UPDATE cache SET ino=?, mtime_ns=? WHERE key=?",
                          [(ino, mtime, key) for key, ino, mtime in stamps])

    def cache_evict(self, keys: list[str]) -> list[CacheFile]:
        """Delete cache rows (in one transaction) and return them; the caller unlinks files."""
        if not keys:
            return []
        with self.tx() as c:
            marks = ",".join("?" * len(keys))
            cur = c.execute(f"SELECT key, path, bytes FROM cache WHERE key IN ({marks})", keys)
            rows = [CacheFile(*r) for r in cur.fetchall()]
            c.execute(f"DELETE FROM cache WHERE key IN ({marks})", keys)
        return rows

    def cache_entries(self) -> list[CacheEntry]:
        """Every entry, least recently used first."""
        return [CacheEntry(*r) for r in self.conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM cache ORDER BY last_used, rowid")]

    def cache_page(self, after: tuple[float, int], limit: int) -> list[CacheEntry]:
        """The next ``limit`` entries after ``after`` = (last_used, rowid) in least
        recently used order (a keyset walk of the cache_lru index)."""
        return [CacheEntry(*r) for r in self.conn.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM cache WHERE (last_used, rowid) > (?, ?) "
            "ORDER BY last_used, rowid LIMIT ?", (*after, limit))]

    def cache_last_rowid(self) -> int:
        """The highest rowid in the cache now (0: empty): entries added later are above."""
        return int(self.one("SELECT MAX(rowid) FROM cache") or 0)

    def cache_totals(self) -> CacheTotals:
        entries, size = self.conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM cache").fetchone()
        return CacheTotals(int(entries), int(size))
