"""The old name of fastattn.launchers.key_bounds (a key-padding mask's key bounds), kept for the
importers outside the launcher layer (fastattn.distributed.blocks, tests, benchmarks) until they
import fastattn.launchers.key_bounds themselves."""

from fastattn.launchers.key_bounds import key_bounds, key_bounds_torch

__all__ = ["key_bounds", "key_bounds_torch"]
