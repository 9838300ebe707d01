"""Loading DeepSeek-V3.2 safetensors checkpoints (single file or sharded; FP8 block-scaled or float).

Loading runs in two passes. The first reads only the file headers and checks every name, shape and dtype
against ``model.checkpoint_targets()``, so a wrong checkpoint fails before any weight data is read. The second
reads the tensors one at a time and copies each into the parameter (or stacked-expert view) it fills.
Every error is a :class:`CheckpointError` that names the file and the tensor.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from dsv.config import ModelConfig
from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_LISTED = 10  # names shown in an error before "... and N more"

# safetensors header dtype codes -> torch dtypes (codes not listed here are refused).
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the model; the message names the file and the tensor."""


@dataclass(frozen=True)
class _Entry:
    """One tensor as its file header describes it."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


def checkpoint_files(path: Path) -> dict[str, list[str]]:
    """The safetensors files of a checkpoint folder: file name -> tensor names the index assigns to it.

    A sharded checkpoint is found through ``model.safetensors.index.json``; a single-file one is
    ``model.safetensors`` (its list of names is empty: only the file itself knows them).
    """
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        for shard, names in shards.items():
            if not (path / shard).is_file():
                raise CheckpointError(
                    f"{index} names shard {shard!r}, which does not exist in {path} "
                    f"(it should hold {_listing(names)})"
                )
        return shards
    if (path / SINGLE_FILE).is_file():
        return {SINGLE_FILE: []}
    found = sorted(p.name for p in path.glob("*.safetensors"))
    raise CheckpointError(
        f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} exists"
        + (f" (found {', '.join(found)} without an index)" if found else "")
    )


def load_weights(model: DeepseekV32ForCausalLM, path: str | Path, progress: bool | None = None) -> None:
    """Fill every parameter of ``model`` from the checkpoint folder ``path``.

    Float tensors are converted to the parameter's dtype (e.g. a bf16 checkpoint into an fp32 model); FP8
    tensors must match the parameter's FP8 dtype exactly, and FP8 is never mixed with float. ``progress``
    shows a tqdm bar over tensors; by default only when stderr is a terminal.

    Raises:
        CheckpointError: a tensor is missing, unexpected, duplicated, of the wrong shape or dtype, or a file
            is unreadable; nothing has been copied when it is raised from the header checks.
    """
    path = Path(path)
    targets = model.checkpoint_targets()
    _check_coverage(model, targets)
    files = checkpoint_files(path)
    entries = _read_headers(path, files)
    _check_names(path, files, entries, targets)
    for name, entry in entries.items():
        target = targets[name]
        if target is not None:  # None: present in real checkpoints but deliberately not loaded
            _check_tensor(name, entry, target)

    show = sys.stderr.isatty() if progress is None else progress
    filled: set[str] = set()
    by_file: dict[Path, list[str]] = {}
    for name, entry in entries.items():
        by_file.setdefault(entry.file, []).append(name)
    with tqdm(total=len(entries), desc="Loading weights", unit="tensor", disable=not show) as bar:
        for file, names in by_file.items():
            with _open(file, names) as f:
                for name in names:
                    target = targets[name]
                    if target is not None:
                        _copy(f, file, name, target)
                    filled.add(name)
                    bar.update(1)
    unfilled = sorted(n for n, t in targets.items() if t is not None and n not in filled)
    if unfilled:  # the name checks make this unreachable; keep the guarantee explicit
        raise CheckpointError(f"{path}: {len(unfilled)} tensor(s) were not loaded: {_listing(unfilled)}")


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> DeepseekV32ForCausalLM:
    """Parse ``path/config.json``, build the model in ``dtype`` on ``device`` and load its weights.

    The model is built on the meta device and then allocated uninitialized on ``device``: every parameter
    is overwritten by the checkpoint (``load_weights`` fails when one is missing), so random initialization
    would be wasted work. Returns the model in eval mode.
    """
    path = Path(path)
    cfg = ModelConfig.from_file(path)
    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(cfg, dtype)
    model.to_empty(device=device)
    model.reset_buffers()
    load_weights(model, path, progress)
    return model.eval()


def _check_coverage(model: torch.nn.Module, targets: dict[str, torch.Tensor | None]) -> None:
    """Every parameter must be (a view of) some target: ``load_model`` leaves the rest uninitialized memory."""
    filled = {t.untyped_storage().data_ptr() for t in targets.values() if t is not None}
    for name, p in model.named_parameters():
        if p.device.type != "meta" and p.untyped_storage().data_ptr() not in filled:
            raise RuntimeError(f"model parameter {name!r} is not filled by any checkpoint tensor")


# ----- header pass -----


def _read_headers(path: Path, files: dict[str, list[str]]) -> dict[str, _Entry]:
    """Every tensor's file, dtype and shape, from the headers alone (no tensor data is read)."""
    entries: dict[str, _Entry] = {}
    for file_name, indexed in files.items():
        file = path / file_name
        with _open(file, indexed) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if name in entries:
                    raise CheckpointError(f"{file}: tensor {name!r} is also stored in {entries[name].file}")
                sl = f.get_slice(name)
                entries[name] = _Entry(file, sl.get_dtype(), tuple(sl.get_shape()))
        absent = [n for n in indexed if n not in entries or entries[n].file != file]
        if absent:
            raise CheckpointError(
                f"{file}: {len(absent)} tensor(s) that {INDEX_FILE} assigns to this shard are not in it: "
                f"{_listing(absent)}"
            )
    return entries


def _check_names(
    path: Path,
    files: dict[str, list[str]],
    entries: dict[str, _Entry],
    targets: dict[str, torch.Tensor | None],
) -> None:
    unexpected = [n for n in entries if n not in targets]
    if unexpected:
        shown = ", ".join(f"{n!r} (in {entries[n].file.name})" for n in unexpected[:MAX_LISTED])
        more = len(unexpected) - MAX_LISTED
        raise CheckpointError(
            f"{path}: {len(unexpected)} unexpected tensor(s), not part of a DeepSeek-V3.2 model with this "
            f"config.json: {shown}" + (f" ... and {more} more" if more > 0 else "")
        )
    # A None target (the MTP layer's embed/head copies) carries nothing the model needs, so it may be absent.
    missing = [n for n, t in targets.items() if n not in entries and t is not None]
    if missing:
        where = path / (SINGLE_FILE if files == {SINGLE_FILE: []} else INDEX_FILE)
        raise CheckpointError(
            f"{where}: {len(missing)} tensor(s) missing from the checkpoint: {_listing(missing)}"
        )


def _check_tensor(name: str, entry: _Entry, target: torch.Tensor) -> None:
    if entry.shape != tuple(target.shape):
        raise CheckpointError(
            f"{entry.file}: tensor {name!r} has shape {entry.shape}, expected {tuple(target.shape)}"
        )
    found = _ST_DTYPES.get(entry.dtype)
    if target.dtype in _FP8_DTYPES:
        ok = found == target.dtype  # FP8 bits are copied as they are: the format must be the same
        expected = f"{target.dtype}"
    else:
        ok = found is not None and found.is_floating_point and found not in _FP8_DTYPES
        expected = f"a float dtype (converted to {target.dtype})"
    if not ok:
        raise CheckpointError(
            f"{entry.file}: tensor {name!r} has dtype {entry.dtype} ({found or 'unsupported'}), expected "
            f"{expected}; does config.json's quantization_config match these weights?"
        )


# ----- data pass -----


def _copy(f, file: Path, name: str, target: torch.Tensor) -> None:
    try:
        tensor = f.get_tensor(name)
    except Exception as exc:  # safetensors raises several exception types for damaged data
        raise CheckpointError(f"{file}: cannot read tensor {name!r} ({exc})") from exc
    with torch.no_grad():
        target.copy_(tensor)


def _open(file: Path, names: list[str]):
    """``safe_open`` with a :class:`CheckpointError` that explains why the file is unreadable."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises several exception types for corrupt files
        reason = _diagnose(file) or str(exc)
        held = f"; it should hold {_listing(names)}" if names else ""
        raise CheckpointError(f"{file}: unreadable safetensors file ({reason}){held}") from exc


def _diagnose(file: Path) -> str:
    """Why a safetensors file is damaged, naming the first tensor cut off when the header is intact."""
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                return f"{size} bytes, too short for a safetensors header"
            n = int.from_bytes(prefix, "little")
            if n > size - 8:
                return f"header length {n} exceeds the file size {size}"
            header = json.loads(fh.read(n))
        data = size - 8 - n
        for name, info in header.items():
            if name != "__metadata__" and info["data_offsets"][1] > data:
                return (
                    f"truncated: tensor {name!r} ends at byte {info['data_offsets'][1]} of the data section, "
                    f"which has {data} bytes"
                )
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return ""  # the header itself is garbage: safetensors' own message says more than we can
    return ""


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:MAX_LISTED])
    more = len(names) - MAX_LISTED
    return shown + (f" ... and {more} more" if more > 0 else "")
