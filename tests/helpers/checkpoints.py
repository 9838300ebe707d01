"""Tiny DeepSeek-V3.2 checkpoints written in the real on-disk format, for tests.

The tensor names, shapes and dtypes come from the model's own ``checkpoint_targets()`` (through
:func:`dsv.model.default_model.checkpoint_specs`), so these checkpoints cannot drift from the model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dsv.config import ModelConfig
from dsv.model.default_model import random_checkpoint, save_checkpoint
from tests.model_factory import FP8_QUANT, TINY_CONFIG

#: A small but complete config (the one the in-memory test models use) in the original DeepSeek form.
TINY_CHECKPOINT_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV32ForCausalLM"],
    **TINY_CONFIG,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "rms_norm_eps": 1e-6,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "bfloat16",
}
FP8_QUANTIZATION_CONFIG: dict[str, Any] = FP8_QUANT


def tiny_checkpoint_config(
    config_overrides: dict[str, Any] | None = None, fp8: bool = True
) -> dict[str, Any]:
    """The config.json dict :func:`write_tiny_checkpoint` writes."""
    cfg = {**TINY_CHECKPOINT_CONFIG, **(config_overrides or {})}
    if fp8:
        cfg.setdefault("quantization_config", FP8_QUANTIZATION_CONFIG)
    else:
        cfg.pop("quantization_config", None)
    return cfg


def write_tiny_checkpoint(
    dir: Path,
    config_overrides: dict[str, Any] | None = None,
    fp8: bool = True,
    shards: int = 1,
    seed: int = 0,
) -> Path:
    """Write config.json and a random checkpoint (bf16 floats; FP8 block weights when ``fp8``) into ``dir``.

    ``shards == 1`` writes ``model.safetensors``; more writes that many shards and the index. The MTP layer's
    embedding/lm_head copies are included, as in real checkpoints. Returns ``dir``.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    cfg_dict = tiny_checkpoint_config(config_overrides, fp8)
    save_checkpoint(random_checkpoint(ModelConfig.from_dict(cfg_dict), seed), dir, shards)
    (dir / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    return dir


def read_checkpoint(dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``dir`` (tests only: loads all of them)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                tensors[name] = f.get_tensor(name)
    return tensors


def add_to_hf_cache(cache: Path, repo_id: str, source: Path, commit: str = "0" * 40) -> Path:
    """Lay out the files of ``source`` in a Hugging Face hub cache the way ``huggingface_hub`` does.

    ``models--org--name/blobs/<sha256>`` hold the bytes, ``snapshots/<commit>/<file>`` are relative symlinks
    to them and ``refs/main`` holds ``commit``. Returns the snapshot folder.
    """
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(Path(source).iterdir()):
        if file.is_file():
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
