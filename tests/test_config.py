"""config.json parsing in the original DeepSeek form and the transformers 5 form."""

from __future__ import annotations

import copy
import json

import pytest

from dsv.config import DEEPSEEK_V32_EXP_CONFIG, ConfigError, ModelConfig

#: The published V3.2-Exp config.json (kept in dsv.config for full-width benchmarks too).
ORIGINAL = copy.deepcopy(DEEPSEEK_V32_EXP_CONFIG)


def transformers5_form() -> dict:
    cfg = {
        k: v
        for k, v in ORIGINAL.items()
        if k
        not in ("rope_scaling", "rope_theta", "torch_dtype", "first_k_dense_replace", "quantization_config")
    }
    cfg["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    cfg["dtype"] = "bfloat16"
    cfg["layer_types"] = ["indexed_attention"] * 61
    cfg["mlp_layer_types"] = ["dense"] * 3 + ["sparse"] * 58
    return cfg


def test_original_form():
    cfg = ModelConfig.from_dict(ORIGINAL)
    assert cfg.first_k_dense_replace == 3 and cfg.is_moe_layer(3) and not cfg.is_moe_layer(2)
    assert cfg.quant is not None and cfg.quant.scale_fmt == "ue8m0" and cfg.quant.block_size == (128, 128)
    assert cfg.rope.rope_type == "yarn" and cfg.rope.factor == 40
    assert cfg.kv_cache_dim == 576 and cfg.qk_head_dim == 192 and cfg.has_mtp
    assert cfg.dtype == "bfloat16"


def test_transformers5_form_matches_original():
    a = ModelConfig.from_dict(ORIGINAL)
    b = ModelConfig.from_dict(transformers5_form())
    assert b.first_k_dense_replace == 3
    assert b.rope == a.rope
    assert b.softmax_scale == pytest.approx(a.softmax_scale)
    assert b.quant is None  # transformers writes no quantization_config for float checkpoints


def test_from_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ORIGINAL))
    assert ModelConfig.from_file(tmp_path).hidden_size == 7168


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"model_type": "llama"}, "model_type 'llama' is not supported"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope type 'linear'"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantization method 'awq'"),
        ({"mlp_layer_types": ["dense"] * 2}, "mlp_layer_types has 2 entries"),
    ],
)
def test_errors_are_clear(patch, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**ORIGINAL, **patch})


def test_missing_and_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
