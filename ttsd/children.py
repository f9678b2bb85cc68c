"""What every helper process the daemon spawns does first (phonemizers, encoders): it
leaves stopping to the daemon and ends with it.

A Ctrl-C reaches the terminal's whole process group; a helper took it as
KeyboardInterrupt and died with a traceback (a busy one under the text or audio it
held) while the daemon was still finishing its lines: helpers ignore SIGINT and are
shut down by the daemon. A helper's task queue keeps both ends of its pipe open in the helper itself
(multiprocessing hands it both), so a daemon killed with SIGKILL (systemd's last resort,
the OOM killer) left it waiting forever, re-parented: each helper watches its parent
and exits when it is gone.
"""

from __future__ import annotations

import os
import signal
import threading
import time


def helper_setup(parent: int) -> None:
    """A helper process's first step (its pool's initializer); ``parent``: the
    daemon's pid."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="ttsd-parent-watch", daemon=True).start()
