"""The embedded default model: a tiny DeepSeek-V3.2-architecture checkpoint built deterministically.

It has the real on-disk format: a sharded safetensors checkpoint with ``model.safetensors.index.json``,
FP8 e4m3 block-quantized projections with ``weight_scale_inv``, bf16 norms / embeddings / lm_head / router /
indexer ``weights_proj`` / ``eh_proj``, fp32 router bias and indexer ``k_norm``, an MTP layer with its copies of
the embedding and the lm_head, and the real DeepSeek-V3 tokenizer. ``index_topk`` is 32, so prompts longer than
32 tokens take the sparse attention path. The weights are random: it exercises every code path, it does not
speak.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dsv.config import FP8_QUANTIZATION_CONFIG, ModelConfig, yarn_rope_scaling

log = logging.getLogger(__name__)

VERSION = 1
SEED = 20251129
NUM_SHARDS = 2
MARKER = ".dsv-complete"  # written last, inside the temp folder, so only complete builds ever carry it

DEFAULT_MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "vocab_size": 129280,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 128,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "index_n_heads": 4,
    "index_head_dim": 64,
    "index_topk": 32,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 4096,
    "rope_theta": 10000,
    "rope_scaling": yarn_rope_scaling(4, 1024),
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": dict(FP8_QUANTIZATION_CONFIG),
}

GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": 0,
    "eos_token_id": 1,
    "do_sample": True,
    "temperature": 1.0,
    "top_p": 0.95,
}


def default_cache_dir() -> Path:
    """Where the default model lives: ``$DSV_CACHE_DIR/default-model-v1`` (``DSV_CACHE_DIR`` defaults to
    ``~/.cache/dsv``)."""
    root = Path(os.environ.get("DSV_CACHE_DIR") or Path.home() / ".cache" / "dsv").expanduser()
    return root / f"default-model-v{VERSION}"


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """The folder of the default model, built on first use.

    The model is built in a temporary sibling folder that is renamed into place in one step, so concurrent
    first uses are safe: one rename wins, the others find the finished folder and discard their copy.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (target / MARKER).is_file():
        return target
    log.info("building the default model in %s (first use)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        build_default_model(tmp)
        (tmp / MARKER).write_text(f"{VERSION}\n")
        try:
            os.rename(tmp, target)  # atomic; replaces an empty folder, fails on a non-empty one
        except OSError:
            if not (target / MARKER).is_file():
                raise RuntimeError(
                    f"{target} exists and is not a complete dsv default model (no {MARKER}); "
                    "remove it or point DSV_CACHE_DIR elsewhere"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_default_model(folder: Path) -> None:
    """Write config, generation config, tokenizer files and the two-shard FP8 checkpoint into ``folder``."""
    from dsv.tokenizer import packaged_tokenizer_path

    cfg = ModelConfig.from_dict(DEFAULT_MODEL_CONFIG)
    save_checkpoint(random_checkpoint(cfg, SEED), folder, NUM_SHARDS)
    (folder / "config.json").write_text(json.dumps(DEFAULT_MODEL_CONFIG, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    tokenizer = packaged_tokenizer_path()
    shutil.copyfile(tokenizer, folder / "tokenizer.json")
    shutil.copyfile(tokenizer.with_name("tokenizer_config.json"), folder / "tokenizer_config.json")


def checkpoint_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a real checkpoint for ``cfg`` holds, derived from the model.

    Float tensors are bf16 (the checkpoints' dtype) unless the model keeps them in fp32 (router bias,
    indexer ``k_norm``). The MTP layer's embed/head copies, which the model does not load, take the shapes
    of the main embedding and lm_head.
    """
    from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM

    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(cfg, torch.bfloat16)
    targets = model.checkpoint_targets()
    specs = {}
    for name, t in targets.items():
        if t is None:
            t = targets[_copy_source(name)]
            assert t is not None
        specs[name] = (tuple(t.shape), t.dtype)
    return specs


def random_checkpoint(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random tensors for every name of :func:`checkpoint_specs`, FP8 ones block-quantized.

    Matrices are N(0, 1/fan_in) so activations stay O(1) through the projections; norm weights are 1, the
    indexer ``k_norm`` bias 0, other vectors (the router's correction bias) small. The same ``seed`` always
    gives the same bytes.
    """
    from dsv.ops.quant import weight_quant

    gen = torch.Generator().manual_seed(seed)
    specs = checkpoint_specs(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in sorted(specs.items()):
        if name.endswith("weight_scale_inv") or _is_copy(name):
            continue  # made together with their weight / copied below
        if len(shape) == 2:
            w = torch.randn(shape, generator=gen) * shape[1] ** -0.5
            if dtype == torch.float8_e4m3fn:
                block = cfg.quant.block_size if cfg.quant else (128, 128)
                out[name], out[name + "_scale_inv"] = weight_quant(w, block)
            else:
                out[name] = w.to(dtype)
        elif name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=dtype)
        elif name.endswith("k_norm.bias"):
            out[name] = torch.zeros(shape, dtype=dtype)
        else:
            out[name] = (torch.randn(shape, generator=gen) * 0.01).to(dtype)
    for name in specs:
        if _is_copy(name):  # copies, as in the real checkpoint
            out[name] = out[_copy_source(name)].clone()
    missing = set(specs) - set(out)
    assert not missing, f"no random tensor made for {sorted(missing)}"
    return out


def save_checkpoint(tensors: dict[str, torch.Tensor], folder: Path, num_shards: int = 1) -> None:
    """Save ``tensors`` as ``model.safetensors``, or as ``num_shards`` shards plus the index.

    Shards are contiguous runs of the sorted names split at equal byte counts, as Hugging Face writes them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if num_shards == 1:
        save_file(
            {n: tensors[n].contiguous() for n in names}, str(folder / "model.safetensors"), {"format": "pt"}
        )
        return
    if not 1 < num_shards <= len(names):
        raise ValueError(f"cannot split {len(names)} tensors into {num_shards} shards")
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total = sum(sizes)
    groups: list[list[str]] = [[] for _ in range(num_shards)]
    done = k = 0
    for i, (name, size) in enumerate(zip(names, sizes)):
        # A name goes to the shard where its first byte falls, but no shard is skipped and every later shard
        # keeps at least one name.
        k = min(done * num_shards // max(total, 1), k + 1, num_shards - 1)
        k = max(k, num_shards - (len(names) - i))
        groups[k].append(name)
        done += size
    weight_map = {}
    for k, group in enumerate(groups):
        shard = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(folder / shard), {"format": "pt"})
        weight_map.update(dict.fromkeys(group, shard))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _is_copy(name: str) -> bool:
    """The MTP layer's copies of the main embedding and lm_head."""
    return name.endswith(".shared_head.head.weight") or (
        name.endswith(".embed_tokens.weight") and name != "model.embed_tokens.weight"
    )


def _copy_source(name: str) -> str:
    return "lm_head.weight" if name.endswith(".shared_head.head.weight") else "model.embed_tokens.weight"
