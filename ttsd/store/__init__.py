"""The journal: SQLite holding every file's and line's state, the cache rows and the
daemon's own facts. Only this package imports ``sqlite3``.

- ``journal``: ``Store``, one connection: files, lines, batches, heartbeat, workers.
- ``cache``: the cache rows (hits, stamps, evictions, the purge walk).
- ``report``: whole-journal reads for ``ttsd status``, ``run --once`` and the benches.
- ``base``: opening a connection, its transactions and checks.
- ``migrations``: the schema, m001 onwards, and the runner.
- ``salvage``: a fresh journal from what can be read of a damaged one.
- ``records``: the typed records the store takes and returns.
- ``errors``: what an SQLite error means (damage, a fault of the machine, a newer
  journal), for code outside this package.
"""
