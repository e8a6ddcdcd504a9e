"""ComfyUI custom node "Apply Skip-Tuning schedule": a tuned schedule file applied to a MODEL.

Installed by linking this folder into ComfyUI's ``custom_nodes`` (docs/comfyui.md):

    ln -s "$PWD/skiptune_search/comfyui" /path/to/ComfyUI/custom_nodes/skiptune-search

ComfyUI then imports this file under a name of its own, not as ``skiptune_search.comfyui``: the
``skiptune_search`` package of the checkout the link points into is loaded first (its
``__init__`` imports nothing; the node then needs ``skiptune_search.core`` alone: torch, which
ComfyUI has, and the standard library), unless a ``skiptune_search`` is loaded already.
"""

import importlib.util
import sys
from pathlib import Path

if "skiptune_search" not in sys.modules:  # loaded by ComfyUI from custom_nodes/, not from the package
    _package = Path(__file__).resolve().parent.parent
    _spec = importlib.util.spec_from_file_location("skiptune_search", _package / "__init__.py",
                                                   submodule_search_locations=[str(_package)])
    sys.modules["skiptune_search"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["skiptune_search"])

from skiptune_search.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
