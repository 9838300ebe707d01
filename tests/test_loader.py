"""Checkpoint loading: single/sharded files, dtypes, the ragged FP8 block, and errors naming file and tensor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv.config import ModelConfig
from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM
from dsv.model.loader import CheckpointError, load_model, load_weights
from dsv.ops.quant import weight_quant
from tests.helpers.checkpoints import read_checkpoint, write_tiny_checkpoint

Q_A = "model.layers.0.self_attn.q_a_proj.weight"
KV_A = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
NORM = "model.norm.weight"
INDEX = "model.safetensors.index.json"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """FP8 tensors compared bit for bit (torch.equal does not take float8)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _rewrite(file: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, str(file))


def _fails(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path, progress=False)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----- formats -----


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("fp8", [True, False])
def test_round_trip_is_exact(tmp_path: Path, shards: int, fp8: bool):
    write_tiny_checkpoint(tmp_path, fp8=fp8, shards=shards, seed=3)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) == shards and (tmp_path / INDEX).exists() == (shards > 1)
    model = load_model(tmp_path, torch.bfloat16, progress=False)
    saved = read_checkpoint(tmp_path)
    targets = model.checkpoint_targets()
    assert set(saved) == set(targets)
    for name, tensor in saved.items():
        if targets[name] is not None:
            assert targets[name].dtype == tensor.dtype, name
            assert torch.equal(_bits(targets[name]), _bits(tensor)), name
    expected = torch.float8_e4m3fn if fp8 else torch.bfloat16
    assert model.model.layers[1].mlp.experts.w1.dtype == expected
    # a stacked-expert tensor is filled through its per-expert views
    assert torch.equal(
        _bits(model.model.layers[1].mlp.experts.w2[5]),
        _bits(saved["model.layers.1.mlp.experts.5.down_proj.weight"]),
    )
    assert not model.training


def test_shard_index_covers_every_tensor(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, shards=2)
    weight_map = json.loads((tmp_path / INDEX).read_text())["weight_map"]
    assert set(weight_map) == set(read_checkpoint(tmp_path))
    assert set(weight_map.values()) == {p.name for p in tmp_path.glob("*.safetensors")}


def test_bf16_checkpoint_into_fp32_model(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, fp8=False)
    model = load_model(tmp_path, torch.float32, progress=False)
    saved = read_checkpoint(tmp_path)
    assert saved["lm_head.weight"].dtype == torch.bfloat16
    for name, target in model.checkpoint_targets().items():
        if target is not None:
            assert target.dtype == torch.float32, name
            assert torch.equal(target, saved[name].float()), name


def test_fp8_checkpoint_into_fp32_model_keeps_fp8(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, fp8=True)
    model = load_model(tmp_path, torch.float32, progress=False)
    attn = model.model.layers[0].self_attn
    assert attn.q_a_proj.weight.dtype == torch.float8_e4m3fn
    assert attn.q_a_layernorm.weight.dtype == torch.float32
    assert attn.indexer.k_norm.weight.dtype == torch.float32


def test_ragged_fp8_block_dequantizes_correctly(tmp_path: Path):
    # kv_a output = kv_lora_rank + rope = 512 + 64 = 576 rows, as in the real model: 5 row blocks, the last
    # one 64 rows (ragged).
    write_tiny_checkpoint(tmp_path, {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "index_head_dim": 128})
    w = torch.randn(576, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    w[512:] *= 8  # the ragged block gets its own, larger scale
    q, s = weight_quant(w)
    assert s.shape == (5, 1)

    def edit(t):
        t[KV_A], t[KV_A + "_scale_inv"] = q, s

    _rewrite(tmp_path / "model.safetensors", edit)
    lin = load_model(tmp_path, torch.float32, progress=False).model.layers[0].self_attn.kv_a_proj_with_mqa
    assert lin.weight_scale_inv.shape == (5, 1)
    assert torch.equal(lin.weight_scale_inv, s)
    deq = lin.dequantized(torch.float32)
    for rb in range(5):  # W[i, j] = W_fp8[i, j] * scale_inv[i // 128, j // 128], computed block by block
        rows = slice(rb * 128, min((rb + 1) * 128, 576))
        torch.testing.assert_close(deq[rows], q[rows].float() * s[rb, 0], rtol=0, atol=0)
    # the ragged block's scale comes from its own 64 rows only: its largest value maps to the FP8 maximum
    torch.testing.assert_close(s[4, 0], w[512:].abs().max() / 448)
    torch.testing.assert_close(deq, w, rtol=0.07, atol=1e-6)


def test_load_weights_into_existing_model(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, shards=2)
    model = DeepseekV32ForCausalLM(ModelConfig.from_file(tmp_path), torch.bfloat16)
    load_weights(model, tmp_path, progress=False)
    assert torch.equal(model.lm_head.weight, read_checkpoint(tmp_path)["lm_head.weight"])


def test_progress_bar_on_request_only(tmp_path: Path, capsys):
    write_tiny_checkpoint(tmp_path)
    load_model(tmp_path, progress=False)
    assert "Loading weights" not in capsys.readouterr().err
    load_model(tmp_path, progress=True)
    assert "Loading weights" in capsys.readouterr().err


def test_mtp_copies_may_be_absent(tmp_path: Path):
    # they are duplicates the model never loads; converted checkpoints sometimes drop them
    write_tiny_checkpoint(tmp_path)

    def edit(t):
        del t["model.layers.3.embed_tokens.weight"], t["model.layers.3.shared_head.head.weight"]

    _rewrite(tmp_path / "model.safetensors", edit)
    assert load_model(tmp_path, progress=False).mtp is not None


# ----- errors: each names the file and the tensor -----


@pytest.mark.parametrize("shards", [1, 2])
def test_missing_tensor(tmp_path: Path, shards: int):
    write_tiny_checkpoint(tmp_path, shards=shards)
    name = "model.layers.0.self_attn.o_proj.weight"
    for file in tmp_path.glob("*.safetensors"):
        _rewrite(file, lambda t: t.pop(name, None))
    if shards > 1:  # also drop it from the index, else the index check reports it first
        index = json.loads((tmp_path / INDEX).read_text())
        del index["weight_map"][name]
        (tmp_path / INDEX).write_text(json.dumps(index))
    _fails(tmp_path, "model.safetensors" if shards == 1 else INDEX, "1 tensor(s) missing", repr(name))


def test_many_missing_tensors_are_counted(tmp_path: Path):
    write_tiny_checkpoint(tmp_path)
    _rewrite(tmp_path / "model.safetensors", lambda t: [t.pop(n) for n in list(t) if ".mlp.experts." in n])
    message = _fails(
        tmp_path, "model.safetensors", "missing", "model.layers.1.mlp.experts.0.gate_proj.weight"
    )
    count = 3 * 8 * 3 * 2  # MoE layers 1, 2 and MTP 3 x 8 experts x 3 projections x (weight, scale)
    assert f"{count} tensor(s) missing" in message and f"and {count - 10} more" in message
    assert message.count("mlp.experts.") == 10


def test_tensor_listed_in_index_but_absent_from_shard(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, shards=2)
    shard = json.loads((tmp_path / INDEX).read_text())["weight_map"][NORM]
    _rewrite(tmp_path / shard, lambda t: t.pop(NORM))
    _fails(tmp_path, shard, repr(NORM), "assigns to this shard")


def test_wrong_shape(tmp_path: Path):
    write_tiny_checkpoint(tmp_path)
    _rewrite(tmp_path / "model.safetensors", lambda t: t.update({NORM: torch.ones(7, dtype=torch.bfloat16)}))
    _fails(tmp_path, "model.safetensors", f"tensor {NORM!r} has shape (7,), expected (64,)")


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        (Q_A, torch.bfloat16, "expected torch.float8_e4m3fn"),  # float where FP8 belongs
        (Q_A, torch.float8_e5m2, "expected torch.float8_e4m3fn"),  # another FP8 format
        (NORM, torch.float8_e4m3fn, "expected a float dtype"),  # FP8 where float belongs
        (NORM, torch.int32, "expected a float dtype"),
    ],
)
def test_wrong_dtype(tmp_path: Path, name: str, dtype: torch.dtype, expected: str):
    write_tiny_checkpoint(tmp_path)
    _rewrite(tmp_path / "model.safetensors", lambda t: t.update({name: t[name].float().to(dtype)}))
    _fails(tmp_path, "model.safetensors", f"tensor {name!r} has dtype", expected)


def test_unexpected_tensors_are_listed(tmp_path: Path):
    write_tiny_checkpoint(tmp_path)
    extra = ["model.layers.9.bogus.weight", "model.layers.0.self_attn.rotary_emb.inv_freq"]
    _rewrite(tmp_path / "model.safetensors", lambda t: t.update({n: torch.zeros(1) for n in extra}))
    message = _fails(tmp_path, "2 unexpected tensor(s)", *(f"{n!r} (in model.safetensors)" for n in extra))
    assert "config.json" in message


def test_tensor_in_two_shards(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, shards=2)
    weight_map = json.loads((tmp_path / INDEX).read_text())["weight_map"]
    other = next(s for s in set(weight_map.values()) if s != weight_map[NORM])
    _rewrite(tmp_path / other, lambda t: t.update({NORM: torch.ones(64, dtype=torch.bfloat16)}))
    _fails(tmp_path, repr(NORM), "is also stored in", weight_map[NORM], other)


def test_garbage_file(tmp_path: Path):
    write_tiny_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    _fails(tmp_path, "model.safetensors: unreadable safetensors file")


def test_truncated_file_names_the_cut_tensor(tmp_path: Path):
    write_tiny_checkpoint(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    message = _fails(tmp_path, "model.safetensors: unreadable safetensors file (truncated: tensor '")
    assert "ends at byte" in message


def test_corrupt_shard_names_its_tensors(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, shards=2)
    weight_map = json.loads((tmp_path / INDEX).read_text())["weight_map"]
    shard = weight_map[NORM]
    (tmp_path / shard).write_bytes(b"not a safetensors file at all")
    first = next(n for n, s in weight_map.items() if s == shard)
    _fails(tmp_path, f"{shard}: unreadable safetensors file", "it should hold", repr(first))


def test_index_naming_absent_shard(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, shards=2)
    index = json.loads((tmp_path / INDEX).read_text())
    index["weight_map"][NORM] = "model-00009-of-00009.safetensors"
    (tmp_path / INDEX).write_text(json.dumps(index))
    _fails(
        tmp_path, INDEX, "names shard 'model-00009-of-00009.safetensors', which does not exist", repr(NORM)
    )


def test_invalid_index(tmp_path: Path):
    write_tiny_checkpoint(tmp_path, shards=2)
    (tmp_path / INDEX).write_text("{not json")
    _fails(tmp_path, INDEX, "not a valid safetensors index")


def test_no_weights_at_all(tmp_path: Path):
    write_tiny_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "weights.safetensors")
    _fails(tmp_path, "neither model.safetensors nor", "found weights.safetensors")


def test_parameter_without_checkpoint_tensor_is_refused(tmp_path: Path, monkeypatch):
    # load_model allocates parameters uninitialized: one that no checkpoint tensor fills must not slip through
    write_tiny_checkpoint(tmp_path)
    real = DeepseekV32ForCausalLM.checkpoint_targets

    def without_norm(self):
        targets = real(self)
        del targets[NORM]
        return targets

    monkeypatch.setattr(DeepseekV32ForCausalLM, "checkpoint_targets", without_norm)
    with pytest.raises(RuntimeError, match="model parameter 'model.norm.weight' is not filled"):
        load_model(tmp_path, progress=False)
