"""The pipeline from the journal to the outbox, one step a module, each on its own
thread in the daemon:

- ``batcher``: pending lines → a ``Batch`` (the ``Feeder``: cache hits and WAVs already
  written answered without the model, the rest phonemized);
- ``runner``: a batch through the engine (``Synth``);
- ``sink``: the batch's WAVs, then one journal transaction (``Sink``).
"""
