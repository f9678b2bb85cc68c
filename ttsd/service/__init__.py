"""The daemon around the pipeline, and the commands beside it.

- ``daemon``: builds the stages and runs them; ``loops``: the stage threads;
  ``control``: signals, reload, heartbeat and the ``--once`` report;
- ``workers``, ``pool``, ``ray_backend``, ``messages``: the model on several devices
  (worker processes or Ray actors) and what they say to the daemon;
- ``notify``: systemd's sd_notify; ``sitelock``: one daemon per state folder;
  ``progress``: the ``run --once`` progress bar;
- ``status``, ``status_report``, ``status_text``: ``ttsd status``; ``purge``: ``ttsd
  purge-cache``; ``repair``: ``ttsd repair-store``.
"""
