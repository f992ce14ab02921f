"""Tiny causal LMs trained on synthetic tasks: the checkpoint pool that tests, demo and
benchmarks merge. Importing this package is cheap; torch loads only when a pool is built.
"""

from mergerunner.toys.pool import Pool, build_pool, load_pool
from mergerunner.toys.presets import GENERATOR_VERSION, PRESETS, get_preset

__all__ = ["GENERATOR_VERSION", "PRESETS", "Pool", "build_pool", "get_preset", "load_pool"]
