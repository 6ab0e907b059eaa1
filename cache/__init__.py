"""selkd.cache: build, inspect, verify and read sharded Zarr caches of sparse teacher targets.

The public names are imported on first use (PEP 562): ``import selkd.cache`` (which every
``selkd.cache.*`` import runs first) stays pure Python, so a command line that only parses its
arguments, or only reads a cache's arrays (``info``, ``verify``), never pays for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "CacheCorruptError": "selkd.cache.reader",
    "CacheError": "selkd.cache.reader",
    "CacheReader": "selkd.cache.reader",
    "CachedSequence": "selkd.cache.reader",
    "ClassSpec": "selkd.cache.modes",
    "PartData": "selkd.cache.reader",
    "SparseTargets": "selkd.cache.targets",
    "TeacherOutputs": "selkd.cache.classes",
    "open_cache": "selkd.cache.reader",
    "teacher_outputs": "selkd.cache.classes",
}

__all__ = [
    "CacheCorruptError",
    "CacheError",
    "CacheReader",
    "CachedSequence",
    "ClassSpec",
    "PartData",
    "SparseTargets",
    "TeacherOutputs",
    "__version__",
    "open_cache",
    "teacher_outputs",
]

if TYPE_CHECKING:
    from selkd.cache.classes import TeacherOutputs, teacher_outputs
    from selkd.cache.modes import ClassSpec
    from selkd.cache.reader import CacheCorruptError, CachedSequence, CacheError, CacheReader, PartData, open_cache
    from selkd.cache.targets import SparseTargets


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'selkd.cache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
