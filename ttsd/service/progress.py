"""The progress bar of ``ttsd run --once`` on a terminal (tqdm: the bar redraws itself in
place, and text written through it prints above the bar, never on its line).

Only this module imports tqdm. ``LogStream`` is the stream the log is given while a bar
is shown (``log.setup(stream=...)``): each line it receives is printed with
``tqdm.write``, which clears the bar, prints the line and draws the bar again.
"""

from __future__ import annotations

import shutil
from typing import TextIO

from tqdm import tqdm


class LogStream:
    """A text stream whose lines go above the progress bar."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            tqdm.write(line, file=self._stream)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()


class Bar:
    """Lines finished of the lines taken so far, and the audio's speed. It starts at
    zero; its total is the lines of the files taken, and grows as more are taken."""

    def __init__(self, stream: TextIO) -> None:
        # The terminal's size, or 100 x 24 where it reports none (a pseudo-terminal that
        # was never sized: tqdm would take it for a screen of no rows and draw nothing).
        size = shutil.get_terminal_size((100, 24))
        self._bar = tqdm(total=None, unit=" lines", desc="ttsd", file=stream, leave=True,
                         ncols=size.columns, nrows=max(2, size.lines), mininterval=0.2,
                         bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} lines "
                                    "[{elapsed}<{remaining}{postfix}]")

    def show(self, done: int, total: int, audio_s: float, elapsed_s: float) -> None:
        if total and self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        speed = audio_s / elapsed_s if elapsed_s > 0 else 0.0
        self._bar.set_postfix_str(f"{speed:,.1f}x realtime", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()
