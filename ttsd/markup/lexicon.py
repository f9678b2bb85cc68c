"""A pronunciation lexicon: words the voice says the way the file says.

``input.lexicon`` names a UTF-8 file, one entry a line: a word, a TAB, then either IPA
between slashes (``Siobhan<TAB>/ʃɪˈvɔːn/``) or a respelling the voice reads
(``nguyen<TAB>win``). Blank lines and lines starting with ``#`` are skipped. Words match
whole (letters, digits, ``'`` and ``-`` inside). An entry written in lower case matches
the word in any case (``nguyen``: Nguyen, NGUYEN); one with a capital matches that case
only (``US`` the country, not ``us``). A line's text is rewritten when it is read from its input, so
its cache key, its stored text to say and its audio all follow the lexicon of that
moment; an edited lexicon applies to the next lines read (the file is looked at again,
by its size and time, for each input). Words inside ``<phoneme>``, ``<sub>``,
``<say-as>`` and ``[[ ]]`` are left alone. A line ``[voice NAME]`` or ``[language
CODE]`` starts entries for that voice alone, or for the voices whose name starts with
the code (``en_US``, ``en``); ``[all]`` returns to entries for every voice. A voice's
own entry wins over its language's, which wins over every voice's.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ttsd.log import get_logger

WORD = re.compile(r"\w(?:[\w'’-]*\w)?")
SKIP = re.compile(r"(\[\[.*?\]\]|<[^>]*>|&\w+;|&#\w+;)", re.DOTALL)
"""What is not text to look words up in: phoneme blocks, tags, entities."""
BLOCKS = re.compile(r"(\[\[.*?\]\])", re.DOTALL)
"""In plain text only phoneme blocks are not text ("3 < 4" has no tag)."""
KEEP_INSIDE = ("phoneme", "sub", "say-as")
log = get_logger(__name__)
MAX_ENTRIES = 100_000


class LexiconError(ValueError):
    """A lexicon file that cannot be used: the message names the file and line."""


Table = tuple[dict[str, str], dict[str, str]]
"""A scope's entries: by exact word, and by case-folded word (lower-case entries)."""
HEADER = re.compile(r"\[\s*(?:(voice|language)\s+([A-Za-z0-9_.-]+)|(all))\s*\]")


@dataclass(frozen=True)
class Lexicon:
    scopes: dict[str, Table] = field(default_factory=dict)
    """Entries by scope: "" for every voice, "voice NAME", "language CODE"."""

    @classmethod
    def parse(cls, data: bytes, name: str) -> Lexicon:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise LexiconError(f"{name}: not UTF-8 (byte {exc.start})") from None
        scopes: dict[str, Table] = {}
        scope, count = "", 0
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                m = HEADER.fullmatch(line)
                if m is None:
                    raise LexiconError(f"{name} line {number}: a section is [voice NAME], "
                                       f"[language CODE] or [all]")
                scope = "" if m.group(3) else f"{m.group(1)} {m.group(2)}"
                continue
            word, tab, said = raw.partition("\t")
            word, said = word.strip(), said.strip()
            if not tab or not word or not said:
                raise LexiconError(f"{name} line {number}: expected WORD<TAB>/IPA/ or "
                                   f"WORD<TAB>respelling")
            if WORD.fullmatch(word) is None:
                raise LexiconError(f"{name} line {number}: {word!r} is not one word")
            if said.startswith("/"):
                if len(said) < 3 or not said.endswith("/") or "]]" in said:
                    raise LexiconError(f"{name} line {number}: IPA must be written /…/")
                said = f"[[ {said[1:-1].strip()} ]]"
            elif SKIP.search(said):
                raise LexiconError(f"{name} line {number}: a respelling is plain text")
            exact, folded = scopes.setdefault(scope, ({}, {}))
            exact[word] = said
            if word == word.lower():
                folded[word.casefold()] = said
            count += 1
            if count > MAX_ENTRIES:
                raise LexiconError(f"{name}: more than {MAX_ENTRIES} entries")
        return cls(scopes)

    def tables(self, voice: str) -> list[Table]:
        """The scopes that apply to ``voice``, the most specific first: its own, then
        the languages its name starts with (``en_US`` before ``en``), then every voice's."""
        langs = sorted((k for k in self.scopes if k.startswith("language ")
                        and voice.startswith(k[len("language "):])), key=len, reverse=True)
        keys = [f"voice {voice}", *langs, ""]
        return [self.scopes[k] for k in keys if k in self.scopes]

    def apply(self, text: str, markup: bool = False, voice: str = "") -> str:
        """``text`` for ``voice`` with every lexicon word replaced, outside phoneme
        blocks and, in markup, outside tags and entities and not inside ``<phoneme>``,
        ``<sub>`` or ``<say-as>``."""
        tables = self.tables(voice)
        if not tables:
            return text

        def said(m: re.Match) -> str:
            word = m.group()
            for exact, folded in tables:
                got = exact.get(word) or folded.get(word.casefold())
                if got:
                    return got
            return word

        out, inside = [], 0
        for piece in (SKIP if markup else BLOCKS).split(text):
            if markup and piece.startswith("<"):
                name = piece.strip("</> \t").split()[0].lower() if piece.strip("</> \t") else ""
                if name in KEEP_INSIDE and not piece.endswith("/>"):
                    inside += -1 if piece.startswith("</") else 1
                out.append(piece)
            elif inside > 0 or piece.startswith("[[") or (markup and piece.startswith("&")):
                out.append(piece)
            else:
                out.append(WORD.sub(said, piece))
        return "".join(out)


class LexiconFile:
    """The lexicon at a path, read again when its size, time or inode change. A file
    that became unusable while in use keeps the last good lexicon (``error`` says why,
    logged once)."""

    def __init__(self, path: Path | None) -> None:
        """LexiconError (naming the file and line) if ``path`` cannot be used."""
        self.path = path
        self.lexicon = Lexicon()
        self.error: str | None = None
        self._stamp: tuple[int, int, int] | None = None
        if path is not None:
            self.lexicon = Lexicon.parse(_read(path), str(path))
            self._stamp = _stamp(path)

    def use(self, path: Path | None) -> bool:
        """Read the lexicon at ``path`` from now on (a SIGHUP named another); False, the
        last good one kept and the reason logged, if it cannot be used."""
        try:
            fresh = LexiconFile(path)
        except LexiconError as exc:
            log.error("lexicon.unusable", error=str(exc), kept="the last lexicon read")
            return False
        self.__dict__.update(fresh.__dict__)
        return True

    def current(self) -> Lexicon:
        if self.path is None:
            return self.lexicon
        try:
            stamp = _stamp(self.path)
            if stamp != self._stamp:
                self.lexicon = Lexicon.parse(_read(self.path), str(self.path))
                self._stamp, self.error = stamp, None
        except (OSError, LexiconError) as exc:
            if str(exc) != self.error:
                log.error("lexicon.unusable", error=str(exc), kept="the last lexicon read")
            self.error = str(exc)
        return self.lexicon


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LexiconError(f"{path}: {exc.strerror or exc}") from None


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns
