"""What a checkpoint part is: an object that writes and reads its own folder of a checkpoint.

The engine, the memory bank, the loop's state (and, saved only, the teacher's safetensors file)
are parts; `CheckpointManager.save`/`load` call them by name and never look inside.
"""
from __future__ import annotations

from typing import Protocol


class SavedPart(Protocol):
    """A part that is written with every checkpoint (collective: every rank calls it)."""

    def save(self, directory: str) -> None: ...


class CheckpointPart(SavedPart, Protocol):
    """A part a resume restores: `load` reads what `save` wrote, at any world size the part allows."""

    def load(self, directory: str) -> None: ...
