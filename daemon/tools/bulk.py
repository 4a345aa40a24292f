"""What the commands that work through a whole journal or input share (`omsd replay`,
`omsd ingest`): Python's cycle collector paused while they run.

They make no reference cycles (reference counting frees their garbage), but they
allocate millions of short-lived objects, and each collection walks every live object
again: the ingest's processor drain of 186,590 events took 6.8 s with it, 5.4 s without;
a replay kept everything alive before it streamed, and each full collection cost more.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def no_cycle_collection() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
