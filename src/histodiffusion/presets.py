"""Size presets in one table: ``tiny`` (tests), ``cpu`` (a 2-core machine), ``paper`` (the paper).

Each preset is a partial config laid *under* the experiment file, so an experiment only states
what differs from its preset and every value it does state wins.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "tiny": {
        "data": {"resolution": 32, "cache_shard_size": 64},
    },
    "cpu": {
        "data": {"resolution": 64},
    },
    "paper": {
        "data": {"resolution": 256},
    },
}
