"""Checkpoints: atomic save of named parts and resume (manager.py), the tools' reader (reader.py),
and the layout of older checkpoints (legacy.py)."""
from .manager import MANIFEST, CheckpointManager, is_complete, read_checkpoint_manifest

__all__ = ["MANIFEST", "CheckpointManager", "is_complete", "read_checkpoint_manifest"]
