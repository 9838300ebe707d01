"""Loading DeepSeek-V3.2 safetensors checkpoints (single file or sharded; FP8 block-scaled or float).

Every error names the file and the tensor: a missing tensor, an unexpected one, a wrong shape or dtype, an
unreadable file, or an index that names a shard that is not there.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from dsv.config import ModelConfig
from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


def checkpoint_files(path: Path) -> dict[str, list[str]]:
    """Shard file name -> tensor names it holds (from the index), or the single file with ``None`` names."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        shards: dict[str, list[str]] = defaultdict(list)
        for name, shard in weight_map.items():
            shards[shard].append(name)
        for shard in shards:
            if not (path / shard).exists():
                raise CheckpointError(
                    f"{index} names shard {shard!r} (e.g. for tensor {shards[shard][0]!r}), "
                    f"which does not exist in {path}"
                )
        return dict(shards)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors file and no model.safetensors.index.json in {path}")
    return {f: [] for f in files}


def _check_dtype(file: str, name: str, found: torch.dtype, target: torch.Tensor) -> None:
    if (found in FP8_DTYPES) != (target.dtype in FP8_DTYPES):
        raise CheckpointError(
            f"{file}: tensor {name!r} has dtype {found}, expected "
            f"{'an FP8' if target.dtype in FP8_DTYPES else 'a float'} dtype like {target.dtype} "
            "(is the config's quantization_config right for these weights?)"
        )
    if found.is_floating_point is not None and not found.is_floating_point:
        raise CheckpointError(f"{file}: tensor {name!r} has non-float dtype {found}")


def load_weights(model: DeepseekV32ForCausalLM, path: str | Path, progress: bool | None = None) -> None:
    """Fill every parameter of ``model`` from the checkpoint folder ``path``."""
    path = Path(path)
    targets = model.checkpoint_targets()
    filled: set[str] = set()
    files = checkpoint_files(path)
    total = sum(len(v) for v in files.values()) or None
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=not show) as bar:
        for file in files:
            try:
                handle = safe_open(str(path / file), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises several exception types for corrupt files
                raise CheckpointError(f"{path / file}: unreadable safetensors file ({exc})") from exc
            with handle as f:
                for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    if name not in targets:
                        raise CheckpointError(
                            f"{file}: unexpected tensor {name!r} (not part of a DeepSeek-V3.2 "
                            f"model with this config)"
                        )
                    target = targets[name]
                    filled.add(name)
                    bar.update(1)
                    if target is None:
                        continue  # present in real checkpoints, shared with another tensor
                    try:
                        tensor = f.get_tensor(name)
                    except Exception as exc:
                        raise CheckpointError(f"{path / file}: cannot read tensor {name!r} ({exc})") from exc
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise CheckpointError(
                            f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                            f"{tuple(target.shape)}"
                        )
                    _check_dtype(file, name, tensor.dtype, target)
                    with torch.no_grad():
                        target.copy_(tensor)
    missing = sorted(n for n in targets if n not in filled and targets[n] is not None)
    if missing:
        shown = ", ".join(repr(n) for n in missing[:10])
        raise CheckpointError(
            f"{path}: {len(missing)} tensor(s) missing from {', '.join(files)}: {shown}"
            + (" ..." if len(missing) > 10 else "")
        )


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> DeepseekV32ForCausalLM:
    """Parse ``config.json``, build the model and load its weights; the model is returned in eval mode."""
    path = Path(path)
    cfg = ModelConfig.from_file(path)
    # Build without allocating or initializing, then allocate directly on the target device: every parameter is
    # overwritten by the checkpoint (load_weights fails on any missing one).
    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(cfg, dtype)
    model.to_empty(device=device)
    model.reset_buffers()
    load_weights(model, path, progress)
    return model.eval()
