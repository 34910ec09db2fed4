"""The per-run directory of the workers' metric files (`--workers N`), made by the parent.

Apart from `server.metrics` so the parent process never imports prometheus_client: it only
makes the directory, points `PROMETHEUS_MULTIPROC_DIR` at it for the workers it spawns, and
removes it when they all exited (a stale directory would add a previous run's counts).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set by the parent in each worker: only worker 0 serves the admin listener.
WORKER_ENV = "LLMGW_WORKER_INDEX"


@contextlib.contextmanager
def multiprocess_metrics() -> Iterator[str]:
    """A fresh directory for the metric files of this run's workers, removed at the end."""
    path = tempfile.mkdtemp(prefix="llmgw-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)
