"""For tests that prove an object is freed by reference counting alone (no reference cycle)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_off() -> Iterator[None]:
    """The cyclic collector off inside the block (after one collection of what came before):
    an object still alive in it, with no reference left but a cycle's, is held by that cycle."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
