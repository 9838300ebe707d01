"""What a run needs besides the model, and the JSON writer of its results."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from .timing import Timer


@dataclass
class Settings:
    """Everything a run needs besides the model."""

    device: torch.device
    backend: Any
    choices: dict[str, str]
    kv_dtypes: list[str]
    batches: list[int]
    contexts: list[int]
    modes: list[str]
    dsa_topk: int
    page_size: int
    indexer_quant: str
    dense_indexer: str
    ep: int
    head_vocab: int
    budget: int
    deadline: float
    timer: Timer
    seed: int
    out: str | None = None
    profile_iters: int = 0  # > 0: kernel tables of the attention block and the step (slicebench.profile)

    def save(self, results: dict[str, Any]) -> None:
        """Write what is measured so far (a run cut short by the device's time limit still leaves its cases)."""
        if self.out:
            with open(self.out, "w") as f:
                json.dump(results, f, indent=1)
