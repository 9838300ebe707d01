"""Checkpoint loading: formats, dtypes, and errors that name the file and the tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv.model.loader import CheckpointError, load_model
from dsv.ops.quant import weight_dequant
from tests.checkpoints import write_tiny_checkpoint


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("fp8", [True, False])
def test_round_trip(tmp_path: Path, shards: int, fp8: bool):
    write_tiny_checkpoint(tmp_path, fp8=fp8, shards=shards)
    model = load_model(tmp_path, torch.bfloat16, progress=False)
    saved = {}
    for f in tmp_path.glob("*.safetensors"):
        saved.update(load_file(f))
    targets = model.checkpoint_targets()
    for name, tensor in saved.items():
        if targets[name] is not None:
            assert torch.equal(
                targets[name].view(torch.uint8)
                if fp8 and tensor.dtype == torch.float8_e4m3fn
                else targets[name],
                tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor,
            ), name
    assert model.model.layers[1].mlp.experts.w1.dtype == (torch.float8_e4m3fn if fp8 else torch.bfloat16)


def test_bf16_checkpoint_into_fp32_model(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, fp8=False)
    model = load_model(tmp_path, torch.float32, progress=False)
    assert model.lm_head.weight.dtype == torch.float32
    ref = load_file(tmp_path / "model.safetensors")["lm_head.weight"]
    assert torch.equal(model.lm_head.weight, ref.float())


def test_ragged_fp8_block(tmp_path: Path):
    # kv_a output = kv_lora_rank + rope = 136 + 8 = 144 rows: 2 row blocks, the second one ragged (16 rows)
    write_tiny_checkpoint(tmp_path, {"kv_lora_rank": 136}, fp8=True)
    model = load_model(tmp_path, torch.float32, progress=False)
    lin = model.model.layers[0].self_attn.kv_a_proj_with_mqa
    assert lin.weight_scale_inv.shape == (2, 1)
    full = weight_dequant(lin.weight, lin.weight_scale_inv)
    torch.testing.assert_close(full[128:], lin.weight[128:].float() * lin.weight_scale_inv[1, 0])


def _break(tmp_path: Path, edit) -> Path:
    write_tiny_checkpoint(tmp_path, fp8=True)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, str(f))
    return f


def test_missing_tensor_is_named(tmp_path: Path):
    _break(tmp_path, lambda t: t.pop("model.layers.0.self_attn.o_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing from model.safetensors: 'model.layers.0.self_attn.o_proj"
    ):
        load_model(tmp_path, progress=False)


def test_wrong_shape_is_named(tmp_path: Path):
    def edit(t):
        t["model.norm.weight"] = torch.ones(7, dtype=torch.bfloat16)

    _break(tmp_path, edit)
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: tensor 'model.norm.weight' has shape \(7,\)"
    ):
        load_model(tmp_path, progress=False)


def test_wrong_dtype_is_named(tmp_path: Path):
    name = "model.layers.0.self_attn.q_a_proj.weight"

    def edit(t):
        t[name] = t[name].float()

    _break(tmp_path, edit)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' has dtype torch.float32"):
        load_model(tmp_path, progress=False)


def test_unexpected_tensor_is_named(tmp_path: Path):
    def edit(t):
        t["model.layers.9.bogus.weight"] = torch.zeros(1)

    _break(tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.9.bogus.weight'"):
        load_model(tmp_path, progress=False)


def test_corrupt_file_is_named(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, fp8=True)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"model.safetensors: unreadable safetensors file"):
        load_model(tmp_path, progress=False)


def test_index_naming_absent_shard(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, fp8=True, shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"names shard 'model-00009-of-00009.safetensors'.*model.norm.weight"
    ):
        load_model(tmp_path, progress=False)
