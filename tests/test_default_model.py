"""The embedded default model and --model resolution (folder, Hugging Face cache, errors)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from dsv.model import default_model
from dsv.model.loader import load_model
from dsv.model.resolve import ModelNotFound, resolve_model_path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return default_model.ensure_default_model(tmp_path_factory.mktemp("a") / "default")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_deterministic_and_real_format(built: Path, tmp_path: Path):
    again = default_model.ensure_default_model(tmp_path / "b")
    assert _digest(built) == _digest(again) and len(_digest(built)) == 2
    assert (built / "model.safetensors.index.json").exists() and (built / "tokenizer.json").exists()
    model = load_model(built, torch.bfloat16, progress=False)
    assert model.cfg.index_topk == 32 and model.mtp is not None
    assert model.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.float8_e4m3fn
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_second_call_reuses(built: Path):
    before = (built / "config.json").stat().st_mtime_ns
    assert default_model.ensure_default_model(built) == built
    assert (built / "config.json").stat().st_mtime_ns == before


def test_resolve_folder_and_default(built: Path, monkeypatch):
    assert resolve_model_path(str(built)) == built
    monkeypatch.setattr(default_model, "default_cache_dir", lambda: built)
    assert resolve_model_path(None) == built


def test_resolve_repo_id_from_hub_cache(tmp_path: Path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--deepseek-ai--DeepSeek-V3.2-Exp"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("deepseek-ai/DeepSeek-V3.2-Exp") == snap
    with pytest.raises(ModelNotFound, match="not in the local Hugging Face cache"):
        resolve_model_path("deepseek-ai/Not-There")


def test_resolve_rejects_nonsense(tmp_path: Path):
    with pytest.raises(ModelNotFound, match="not a Hugging Face repo id"):
        resolve_model_path(str(tmp_path / "no" / "such" / "dir"))
