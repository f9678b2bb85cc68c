"""The voice engine: Piper voices as a batched PyTorch VITS model.

Only torch, numpy, onnx and piper's espeak-ng bridge are used here; the engine never
sees the daemon's Config or store.
"""
