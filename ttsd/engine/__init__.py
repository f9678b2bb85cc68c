"""The voice engine: Piper voices as a batched PyTorch VITS model.

In the order a batch meets them:

- ``options``: what an engine is built from (``EngineOptions.from_config``, the one
  place the config is read) and its tuning for the device;
- ``runtime``: the ``Engine`` (``open_engine`` builds it), loaded voices, warm-up;
- ``voice``, ``weights``: finding Piper voices and converting their ONNX files;
- ``model``: what the engine needs from a voice architecture (``VoiceModel``), and the
  architectures: ``vits`` (the network, one module per part) and ``tone`` (no network,
  for load tests); ``loaded``: a voice made ready on the device;
- ``phonemes``: text → phoneme ids, here or in worker processes;
- ``plan``: the text half of a batch (durations, runaway guard);
- ``decode``: the audio half (calls cut by ``packing``, samples into each line);
- ``device``, ``graphs``: the device (process settings, precision flags, memory,
  errors) and the CUDA graphs;
- ``records``: the requests and results it takes and gives.

Only torch, numpy, onnx and piper's espeak-ng bridge are used here; the engine never
sees the daemon's store.
"""
