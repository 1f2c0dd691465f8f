"""cocoef: COCO-EF simulator.

The public names below are the base classes a plugin subclasses (docs/plugins.md) and the Python
API (``from cocoef_cli import api``); they are imported on first use, so ``import cocoef_cli``
(and ``cocoef --help``) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name → the module that defines it
_PUBLIC = {
    "Compressor": "cocoef_cli.sim.compressors",
    "CodeScheme": "cocoef_cli.sim.codes",
    "StragglerModel": "cocoef_cli.sim.stragglers",
    "Method": "cocoef_cli.sim.methods",
    "Model": "cocoef_cli.nets",
    "Loaded": "cocoef_cli.data",
    "Dataset": "cocoef_cli.data",
    "SeedRNG": "cocoef_cli.rng",
    "ConfigError": "cocoef_cli.errors",
}
__all__ = [*_PUBLIC, "api"]


def __getattr__(name: str) -> Any:
    if name == "api":
        return importlib.import_module("cocoef_cli.api")
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'cocoef_cli' has no attribute {name!r}")
