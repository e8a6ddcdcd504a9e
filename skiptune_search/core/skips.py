"""A model's long skips as the rest of the core sees them: ``SkipInfo`` (who makes a skip, who
consumes it, its shape) and the layout's fingerprint. Its own module so that the schedule, FreeU
and the families all read it without importing one another."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class SkipInfo:
    """One long skip: who makes it, who consumes it, its shape."""

    name: str  # the module whose output is saved, e.g. 'down_blocks.1.resnets.0'
    consumer: str  # the module that concatenates it, e.g. 'up_blocks.1.resnets.2'
    channels: int
    resolution: int

    def as_dict(self) -> dict:
        return {"name": self.name, "consumer": self.consumer,
                "channels": self.channels, "resolution": self.resolution}


def layout_fingerprint(arch: str, skips: Sequence[SkipInfo]) -> str:
    """A short hash of the architecture class and the skip layout (names, channels, sizes)."""
    text = json.dumps([arch] + [[s.name, s.channels, s.resolution] for s in skips])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
