"""``ttsd phonemes``: what the voice will say for a text, sentence by sentence, after
its markup, so that a pronunciation can be checked without listening to the audio."""

from __future__ import annotations

from pathlib import Path

from ttsd.config import Config
from ttsd.markup.lexicon import LexiconFile
from ttsd.markup.ssml import MarkupOptions, is_markup, parse


def said_text(cfg: Config, text: str, ssml: bool, lexicon: Path | None = None,
              voice: str = "") -> tuple[bool, str]:
    """(whether ``text`` is SSML, the text after the lexicon: ``lexicon``, else the
    config's), as the daemon takes a line. LexiconError naming the file and line."""
    marked = is_markup(text, ssml or cfg.input.markup == "ssml")
    path = lexicon or (Path(cfg.input.lexicon) if cfg.input.lexicon else None)
    return marked, LexiconFile(path).lexicon.apply(text, marked, voice or cfg.engine.voice)


def phoneme_lines(cfg: Config, text: str, voice: str, ssml: bool,
                  lexicon: Path | None = None) -> list[str]:
    """One line per sentence: its phonemes as Piper's id map takes them, then its speed
    and the silence after it where markup set them. ValueError naming the problem."""
    from ttsd.engine.phonemes import Phonemizer
    from ttsd.engine.voice import discover

    voices = discover(cfg.engine.voices_dir)
    if voice not in voices:
        raise ValueError(f"no voice {voice!r} (see `ttsd voices`)")
    ph = Phonemizer(voices[voice].config)
    marked, text = said_text(cfg, text, ssml, lexicon, voice)
    segments = [(text, 1.0, None)]
    out = []
    if marked:
        m = parse(text, MarkupOptions.from_config(cfg))
        segments = [(s.text, s.rate, s.pause_s) for s in m.segments]
        out += [f"# warning: {w}" for w in m.warnings]
        if m.lead_s:
            out.append(f"# {m.lead_s:g} s of silence first")
    n = 0
    for seg_text, rate, pause in segments:
        sentences = ph.phonemes(seg_text)
        for k, phonemes in enumerate(sentences):
            n += 1
            unknown = sorted({p for p in phonemes if p not in ph.id_map})
            notes = [f"rate {rate:g}"] if rate != 1.0 else []
            if pause is not None and k == len(sentences) - 1:
                notes.append(f"then {pause:g} s" if pause else "then no pause")
            if unknown:
                notes.append(f"not in the voice (skipped): {' '.join(unknown)}")
            tail = f"   [{'; '.join(notes)}]" if notes else ""
            out.append(f"{n:>3}  {''.join(phonemes)}{tail}")
    return out
