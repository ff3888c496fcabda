"""The teacher of every checkpoint as `teacher/teacher.safetensors`: the file the tools read.

The engines' own files are pickles (torch.save; DCP's `.metadata`), and unpickling a file can
run any code in it: massl-export and massl-eval read checkpoints that may come from elsewhere,
so they read this file (tensors only) and the manifest (JSON), and nothing else unless told to
trust the checkpoint (reader.py). Resuming reads the engine's files as before.
"""
from __future__ import annotations

import os

TEACHER_PART = "teacher"
TEACHER_FILE = "teacher.safetensors"
TEACHER_PATH = os.path.join(TEACHER_PART, TEACHER_FILE)  # in a checkpoint directory


class TeacherFile:
    """Checkpoint part, saved only (a resume restores the teacher through the engine's part)."""

    def __init__(self, engine, is_main: bool):
        self.engine, self.is_main = engine, is_main

    def save(self, directory: str) -> None:
        from ..fileio import save_safetensors

        state = self.engine.teacher_state_dict()  # collective
        if self.is_main:
            save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()},
                             os.path.join(directory, TEACHER_FILE))
