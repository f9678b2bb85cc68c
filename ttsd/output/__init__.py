"""What ttsd writes: files written safely (``fsio``: atomic writes, copies, links,
output folders), the WAV format (``wav``), ``manifest.csv`` (``manifest``), and
finished inputs moved to done/ or failed/ (``dispose``). Only this package imports
``soundfile``.
"""
