"""Inline markup: SSML and Piper's phoneme blocks, turned into what the voice says."""
