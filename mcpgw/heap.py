"""The cyclic garbage collector's settings for a long-running gateway process.

Python's defaults suit a short script: a young-generation collection every 700 container objects
allocated (net of those freed), the whole heap walked every hundred of those. A gateway relaying
several thousand calls a second holds about 75,000 objects that never die (the code, Twisted,
the config, the metrics), and every full collection walked them all: 22-46 ms with the reactor
stopped, and caches left cold for the calls after it. Its per-call objects die by reference
counting; only closed sessions leave cycles (a few dozen objects each).

So when twistd starts the service (after it has forked, everything built), what startup made is frozen (``gc.freeze``: moved to a generation no
collection walks) and young collections come every ``YOUNG`` allocations instead of 700.
docs/performance.md ("Garbage collection") has the measurements.
"""

from __future__ import annotations

import gc

from twisted.application.service import Service

#: Net container allocations between young collections (Python's default: 700).
YOUNG = 10_000
#: Young collections per middle one, middle ones per full one (Python's: 10 and 10).
OLDER = 20


class Settle(Service):
    """``settle`` when the gateway's service tree starts (tap.makeService adds it last)."""

    def startService(self) -> None:
        super().startService()
        settle()


def settle() -> None:
    """Collect what startup left, freeze the rest and space the collections out."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG, OLDER, OLDER)
