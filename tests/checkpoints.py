"""Writing tiny checkpoints in the real on-disk format for tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tests.model_factory import FP8_QUANT, TINY_CONFIG, random_tiny_model, tiny_config


def write_tiny_checkpoint(
    folder: Path,
    overrides: dict[str, Any] | None = None,
    fp8: bool = True,
    shards: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """A random tiny model saved as safetensors (``shards`` files + index when > 1) with its config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg_dict = dict(TINY_CONFIG, **(overrides or {}))
    if fp8:
        cfg_dict["quantization_config"] = FP8_QUANT
    model = random_tiny_model(tiny_config(fp8, **(overrides or {})), dtype=dtype, seed=seed)
    tensors = {
        n: t.detach().clone().contiguous() for n, t in model.checkpoint_targets().items() if t is not None
    }
    n = cfg_dict["num_hidden_layers"]
    if cfg_dict.get("num_nextn_predict_layers"):
        tensors[f"model.layers.{n}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors[f"model.layers.{n}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k] for k in names[i::shards]}, str(folder / shard))
            weight_map.update(dict.fromkeys(names[i::shards], shard))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg_dict))
    return folder
