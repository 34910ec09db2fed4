"""The per-run directory of the workers' metric files (`--workers N`), made by the parent.

Apart from `server.metrics` so the parent process never imports prometheus_client: it only
makes the directory, points `PROMETHEUS_MULTIPROC_DIR` at it for the workers it spawns, and
removes it when they all exited (a stale directory would add a previous run's counts).
"""

from __future__ import annotations

import contextlib
import glob
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


# prometheus_client's per-process gauge modes whose values must vanish with the process
# (`multiprocess.mark_process_dead`, without importing prometheus_client in the parent).
_LIVE_MODES = ("liveall", "livesum", "livemax", "livemin", "livemostrecent")


def forget_process(path: str, pid: int) -> None:
    """Drop an exited worker's live gauges (in flight, queue depth): a worker that crashed would
    otherwise count its last in-flight calls in every scrape until the parent exits."""
    for mode in _LIVE_MODES:
        for name in glob.glob(os.path.join(path, f"gauge_{mode}_{pid}.db")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(name)
