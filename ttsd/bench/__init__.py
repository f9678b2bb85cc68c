"""``ttsd bench``: ``run`` (the report: one line at a time, batched, Piper, end to end),
``corpus`` (its lines), ``piper`` (Piper's own onnxruntime path), ``e2e`` (the whole
daemon on a temporary site), ``numerics`` (quality and roofline), ``scale`` (several
devices) and ``load`` (the daemon under a big input). Only the CLI's ``bench`` command
imports it.
"""
