"""The embedded default model (deterministic, real format, safe first use) and ``--model`` resolution."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsv.model import default_model
from dsv.model.loader import load_model
from dsv.model.resolve import ModelNotFound, hub_cache_dir, resolve_model_path
from dsv.tokenizer import packaged_tokenizer_path
from tests.helpers.checkpoints import add_to_hf_cache, write_tiny_checkpoint

FOLDER = f"default-model-v{default_model.VERSION}"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return default_model.ensure_default_model(tmp_path_factory.mktemp("dsv-cache") / FOLDER)


def _sha256(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def _headers(folder: Path) -> dict[str, torch.dtype]:
    dtypes = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                dtypes[name] = f.get_slice(name).get_dtype()
    return dtypes


def _data_bytes(file: Path) -> int:
    """Tensor bytes of a safetensors file: its size less the 8-byte length and the JSON header."""
    with file.open("rb") as fh:
        return file.stat().st_size - 8 - int.from_bytes(fh.read(8), "little")


# ----- the default model -----


def test_build_is_deterministic(built: Path, tmp_path: Path):
    again = default_model.ensure_default_model(tmp_path / FOLDER)
    assert _sha256(built) == _sha256(again)
    assert len(_sha256(built)) == 2
    index = "model.safetensors.index.json"
    assert (built / index).read_bytes() == (again / index).read_bytes()


def test_files_and_config(built: Path):
    assert json.loads((built / "config.json").read_text()) == default_model.DEFAULT_MODEL_CONFIG
    assert json.loads((built / "generation_config.json").read_text())["eos_token_id"] == 1
    assert (built / "tokenizer.json").read_bytes() == packaged_tokenizer_path().read_bytes()
    assert json.loads((built / "tokenizer_config.json").read_text())["add_bos_token"] is False
    index = json.loads((built / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_headers(built))
    assert index["metadata"]["total_size"] == sum(_data_bytes(p) for p in built.glob("*.safetensors"))


def test_real_checkpoint_dtypes_and_mtp_layer(built: Path):
    dtypes = _headers(built)
    fp8 = [
        "model.layers.0.self_attn.q_a_proj",
        "model.layers.0.self_attn.q_b_proj",
        "model.layers.0.self_attn.kv_a_proj_with_mqa",
        "model.layers.0.self_attn.kv_b_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.self_attn.indexer.wq_b",
        "model.layers.0.self_attn.indexer.wk",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.experts.7.up_proj",
        "model.layers.2.mlp.shared_experts.down_proj",
        "model.layers.3.mlp.experts.0.gate_proj",
    ]
    for prefix in fp8:
        assert dtypes[prefix + ".weight"] == "F8_E4M3", prefix
        assert dtypes[prefix + ".weight_scale_inv"] == "F32", prefix
    bf16 = [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.kv_a_layernorm.weight",
        "model.layers.0.self_attn.indexer.weights_proj.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.3.eh_proj.weight",
        "model.layers.3.enorm.weight",
        "model.layers.3.hnorm.weight",
        "model.layers.3.shared_head.norm.weight",
        "model.layers.3.embed_tokens.weight",
        "model.layers.3.shared_head.head.weight",
    ]
    for name in bf16:
        assert dtypes[name] == "BF16", name
    for name in [
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.0.self_attn.indexer.k_norm.weight",
        "model.layers.0.self_attn.indexer.k_norm.bias",
    ]:
        assert dtypes[name] == "F32", name
    assert not any(name.startswith("model.layers.4.") for name in dtypes)


def test_loads_and_runs_sanely(built: Path):
    model = load_model(built, torch.bfloat16, progress=False)
    assert model.cfg.index_topk == 32 and model.mtp is not None
    assert model.cfg.vocab_size == 129280
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    # the MTP layer's checkpoint copies really are copies of the main embedding and head
    tensors = {}
    for file in built.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for name in ("model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"):
                if name in f.keys():  # noqa: SIM118
                    tensors[name] = f.get_tensor(name)
    assert torch.equal(tensors["model.layers.3.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert torch.equal(tensors["model.layers.3.shared_head.head.weight"], model.lm_head.weight)

    from dsv.backend.reference import ReferenceBackend
    from dsv.engine.batch import SeqChunk, build_metadata
    from dsv.engine.kv_pool import CacheSpec, KVPool

    n = 40  # > index_topk: the sparse path
    ids = torch.randint(2, 128000, (n,), generator=torch.Generator().manual_seed(0))
    pool = KVPool(model.cfg, CacheSpec(page_size=16), 4, torch.bfloat16)
    meta = build_metadata([SeqChunk(0, n, pool.allocate(3))], 16)
    with torch.no_grad():
        logits = model.logits(model(ids, meta, pool.layers, ReferenceBackend().ops()))
    assert torch.isfinite(logits).all()
    std = logits.std(dim=-1)
    assert (std > 0.1).all() and (std < 10).all(), std  # neither flat nor exploding


def test_second_call_reuses_the_build(built: Path, monkeypatch):
    monkeypatch.setattr(default_model, "build_default_model", lambda folder: pytest.fail("rebuilt"))
    assert default_model.ensure_default_model(built) == built


def test_cache_dir_from_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("DSV_CACHE_DIR", str(tmp_path))
    assert default_model.default_cache_dir() == tmp_path / FOLDER
    monkeypatch.delenv("DSV_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.default_cache_dir() == tmp_path / "home" / ".cache" / "dsv" / FOLDER


def _fake_build(folder: Path) -> None:
    (folder / "config.json").write_text("{}")


def test_concurrent_first_use_is_safe(tmp_path: Path, monkeypatch):
    barrier = threading.Barrier(4)

    def build(folder: Path) -> None:
        barrier.wait()  # every thread is building at once; all but one lose the rename
        _fake_build(folder)

    monkeypatch.setattr(default_model, "build_default_model", build)
    target = tmp_path / FOLDER
    results: list[Path | BaseException] = []

    def use() -> None:
        try:
            results.append(default_model.ensure_default_model(target))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [FOLDER]  # no temp folder left behind
    assert sorted(p.name for p in target.iterdir()) == [default_model.MARKER, "config.json"]


def test_foreign_folder_is_not_overwritten(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(default_model, "build_default_model", _fake_build)
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="not a complete dsv default model"):
        default_model.ensure_default_model(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert (target / "notes.txt").read_text() == "keep me"


def test_empty_folder_is_filled(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(default_model, "build_default_model", _fake_build)
    (tmp_path / FOLDER).mkdir()
    assert (default_model.ensure_default_model(tmp_path / FOLDER) / default_model.MARKER).is_file()


# ----- resolve_model_path -----


def test_resolve_default_and_folder(built: Path, monkeypatch):
    monkeypatch.setenv("DSV_CACHE_DIR", str(built.parent))
    monkeypatch.setattr(default_model, "build_default_model", lambda folder: pytest.fail("rebuilt"))
    assert resolve_model_path(None) == built
    assert resolve_model_path(str(built)) == built
    assert resolve_model_path(built) == built


@pytest.mark.parametrize("via", ["HF_HUB_CACHE", "HF_HOME"])
def test_resolve_repo_id_from_hub_cache(tmp_path: Path, monkeypatch, via: str):
    cache = tmp_path / "hf" / "hub"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(via, str(cache if via == "HF_HUB_CACHE" else cache.parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: nothing may go to the network
    assert hub_cache_dir() == cache
    source = write_tiny_checkpoint(tmp_path / "src", shards=2)
    snapshot = add_to_hf_cache(cache, "deepseek-ai/DeepSeek-V3.2-Tiny", source, commit="ab" * 20)
    assert (snapshot / "config.json").is_symlink()

    path = resolve_model_path("deepseek-ai/DeepSeek-V3.2-Tiny")
    assert path.resolve() == snapshot.resolve()
    assert load_model(path, progress=False).cfg.hidden_size == 64

    with pytest.raises(ModelNotFound) as info:
        resolve_model_path("deepseek-ai/Not-There")
    message = str(info.value)
    assert "deepseek-ai/Not-There" in message and str(cache) in message and "cannot download" in message


def test_resolve_snapshot_without_config(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "README.md").write_text("no config here")
    add_to_hf_cache(tmp_path / "hub", "org/empty", tmp_path / "src")
    with pytest.raises(ModelNotFound, match="holds no config.json"):
        resolve_model_path("org/empty")


def test_resolve_rejects_files_and_nonsense(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="is a file"):
        resolve_model_path(str(tmp_path / "config.json"))
    with pytest.raises(ModelNotFound, match="not a valid Hugging Face repo id"):
        resolve_model_path(str(tmp_path / "no" / "such" / "dir"))
