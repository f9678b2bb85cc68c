"""Ingest: inbox files into the journal, and finished files out of the work folder.

- ``watch``: noticing inbox files (watchdog events, rescans, settling, open writers);
- ``inbox``: claiming a settled file (a rename into the work folder) and reading it;
- ``parse``, ``csv_input``, ``text``: a claimed file's bytes → ``Line`` / ``LineError``;
- ``names``: safe output names and CSV-safe report cells;
- ``files``: the files stage: a claimed file into the journal (its cache hits answered
  as it is parsed), and finishing it (manifest, done/ or failed/).
"""
