"""The training loop's own checkpoint part: the step and every rank's RNG state.

The data position needs nothing more: the sources resume mid-epoch from the step. Saved
states come back on the same rank when the world size is unchanged (an exact resume, drop-path
included); at another world size rank r is seeded from (run.seed, step, r): deterministic, but
another random stream than the original run's.
"""
from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist

from .dist import DistEnv

STATE_FILE = "state.pt"


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


class TrainerState:
    def __init__(self, env: DistEnv, seed: int):
        self.env, self.seed = env, seed
        self.step = 0

    def rng_states(self) -> list[dict]:
        """Every rank's RNG state, in rank order (collective)."""
        local = _rng_state(self.env.device)
        if self.env.world_size == 1:
            return [local]
        states: list = [None] * self.env.world_size
        dist.all_gather_object(states, local, group=self.env.group)
        return states

    def save(self, directory: str) -> None:
        states = self.rng_states()
        if self.env.is_main:
            torch.save({"step": self.step, "rng": states}, os.path.join(directory, STATE_FILE))

    def load(self, directory: str) -> None:
        self.load_state_dict(torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True))

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        states, env = state["rng"], self.env
        if len(states) != env.world_size:
            digest = hashlib.sha256(f"{self.seed}-{self.step}-{env.rank}".encode()).digest()
            torch.manual_seed(int.from_bytes(digest[:8], "little"))
            return
        torch.set_rng_state(states[env.rank]["cpu"].cpu())
        if env.device.type == "cuda" and "cuda" in states[env.rank]:
            torch.cuda.set_rng_state(states[env.rank]["cuda"].cpu(), env.device)
