"""Checkpoints: atomic, checksummed save of named parts (manager.py), which checkpoint a run
continues and one history per run directory (resume.py), the teacher as safetensors for the
tools (teacher.py), the tools' reader (reader.py), the layout of older checkpoints (legacy.py), and
what a part is (part.py)."""
from .manager import MANIFEST, CheckpointManager, is_complete, read_checkpoint_manifest
from .part import CheckpointPart, SavedPart

__all__ = ["MANIFEST", "CheckpointManager", "CheckpointPart", "SavedPart", "is_complete", "read_checkpoint_manifest"]
