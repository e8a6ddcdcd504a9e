"""Prompt files for text-to-image models: one prompt per line, blank lines ignored.

Which prompt a sample gets is ``prompt_indices``: seed s uses prompt s mod P.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

from ..core.errors import InputError
from ..core.files import read_bounded_text


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a UTF-8 text file, one per non-blank line (surrounding spaces stripped)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"prompt file {path} not found; give a file with one prompt per line", option="prompts")
    text = read_bounded_text(path, "prompt file", error=InputError, option="prompts")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompt file {path} holds no prompt; write one prompt per line", option="prompts")
    return prompts


def prompts_digest(path: str | os.PathLike) -> str:
    """16 hex digits of the prompts of a file (so an edited file is a different task)."""
    return hashlib.sha256("\n".join(read_prompts(path)).encode()).hexdigest()[:16]


def prompt_indices(seeds: Sequence[int], n_prompts: int) -> list[int]:
    """The prompt of each seed's sample: seed s uses prompt s mod P (the (s mod P)-th non-blank
    line of the prompt file), so it is the same in every trial and every batch, and P
    consecutive seeds use every prompt once."""
    return [int(seed) % n_prompts for seed in seeds]
