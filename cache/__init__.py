"""selkd.cache: build, inspect, verify and read sharded Zarr caches of sparse teacher targets."""

from selkd.cache.classes import TeacherOutputs, teacher_outputs
from selkd.cache.modes import ClassSpec
from selkd.cache.reader import (
    CacheCorruptError,
    CachedSequence,
    CacheError,
    CacheReader,
    PartData,
    open_cache,
)
from selkd.cache.targets import SparseTargets

__version__ = "0.1.0"

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
