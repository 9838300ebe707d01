"""A full-width DeepSeek-V3.2 slice on one GPU: the decode step per layer, DSA vs dense attention.

The model is dsv's own ``DeepseekV32ForCausalLM`` with the real V3.2 dimensions (hidden 7168, 128 heads, MLA
1536/512/64/128/128, 256 routed experts top-8 + 1 shared, indexer 64 x 128, top-2048) but only a few layers
(default 1 dense + 4 MoE) and a small vocabulary. Weights are random block-FP8, generated tensor by tensor on
the device. The paged caches (``KVPool``: MLA cache bf16 or FP8 656-byte rows, FP8 indexer keys) are filled with
random values for ``batch`` sequences of ``context`` tokens, and one decode step (one new token per sequence,
metadata from the engine's ``build_metadata``) is timed, exactly as the engine runs it, in two modes:

- ``dsa``: index_topk 2048, the lightning indexer scores every key and sparse MLA reads 2048 of them;
- ``dense``: index_topk = context, so the model takes its "sequence fits in index_topk" path (every key is
  attended: ``sparse_mla_decode`` gets all ``context`` slots). In decode that path still calls the indexer op,
  whose answer is then "every visible position"; ``--dense-indexer skip`` (default) replaces that op by one that
  returns all positions without scoring, ``run`` keeps the real scoring + top-k(context).

Per case it reports the whole step (embedding, all layers, final norm), the attention block (input norm + MLA +
residual) and the indexer and sparse-MLA ops alone; per batch the dense MLP block, the MoE block (256 experts on
one GPU), one expert-parallel shard of the MoE (E/ep experts, 8 x batch routed rows, shared expert and router)
and the full-vocabulary lm_head. Steps and blocks are timed eagerly (what the engine runs today) and as CUDA
graph replays (kernel time without launch overhead). docs/h200-slice.md turns the figures into an estimate of
the full 61-layer model on 8 GPUs.

    python benchmarks/slice_v32.py --out slice.json                               # H200, bf16 KV
    python benchmarks/slice_v32.py --kv-cache-dtype bf16,fp8_e4m3 --time-budget-s 300 --out slice.json
    python benchmarks/slice_v32.py --tiny                                    # CPU, reference backend (seconds)

Cases whose caches do not fit in ``--mem-budget-gb`` (after the weights) are skipped with the reason; when the
caches of every layer do not fit but one layer's does, all layers share one cache (``shared_kv`` in the output:
the bytes read per layer are the same, only the footprint differs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dsv.backend.interface import Kernel, OpTable
from dsv.config import FP8_QUANTIZATION_CONFIG, ModelConfig, yarn_rope_scaling
from dsv.engine.batch import SeqChunk, build_metadata
from dsv.engine.kv_pool import CacheSpec, KVPool
from dsv.model.attention import LayerCache
from dsv.model.deepseek_v32 import DecoderLayer, DeepseekV32ForCausalLM
from dsv.model.moe import MoE
from dsv.ops.metadata import AttentionMetadata
from dsv.ops.moe import ExpertWeights
from dsv.ops.quant import pack_fp8_kv

GB = 1e9
#: Every dimension of DeepSeek-V3.2(-Exp)'s config.json (shared/reference/deepseek-v32-model.md §1.1); the layer
#: counts and the vocabulary are set per run.
V32_CONFIG: dict[str, Any] = {
    "model_type": "deepseek_v32",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "num_attention_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 2048,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": yarn_rope_scaling(40, 4096),
    "rms_norm_eps": 1e-6,
    "torch_dtype": "bfloat16",
    "quantization_config": dict(FP8_QUANTIZATION_CONFIG),
}
#: The CPU check: same structure, tiny widths (kv_lora_rank 128: the FP8 cache layout needs multiples of 128).
TINY_CONFIG: dict[str, Any] = dict(
    V32_CONFIG,
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_attention_heads=4,
    q_lora_rank=64,
    kv_lora_rank=128,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=4,
    index_n_heads=4,
    index_head_dim=32,
    index_topk=16,
    max_position_embeddings=4096,
    rope_scaling=yarn_rope_scaling(4, 1024),
)
#: Std of the random FP8 codes (the block scale maps them to N(0, 1/fan_in)); far from e4m3's 448 limit.
FP8_CODE_STD = 32.0
#: Elements generated per random chunk (bounds the temporary memory of the weight and cache fills).
CHUNK = 1 << 27


# ----- model -----


def slice_config(base: dict[str, Any], dense_layers: int, moe_layers: int, vocab: int) -> ModelConfig:
    """``base`` with ``dense_layers`` dense then ``moe_layers`` MoE decoder layers, no MTP layer."""
    if dense_layers < 0 or moe_layers < 0 or dense_layers + moe_layers < 1:
        raise ValueError(f"need at least one layer, got {dense_layers} dense + {moe_layers} MoE")
    cfg = dict(
        base,
        num_hidden_layers=dense_layers + moe_layers,
        first_k_dense_replace=dense_layers,
        num_nextn_predict_layers=0,
        vocab_size=vocab,
    )
    return ModelConfig.from_dict(cfg)


def _randn(shape: tuple[int, ...] | int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)


def _fill_fp8(t: torch.Tensor, gen: torch.Generator) -> None:
    """Random e4m3 codes of std FP8_CODE_STD, generated CHUNK elements at a time on ``t``'s device."""
    flat = t.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        end = min(start + CHUNK, flat.numel())
        flat[start:end] = _randn(end - start, gen, t.device).mul_(FP8_CODE_STD).to(t.dtype)


def _pow2(x: float) -> float:
    # Power-of-two block scales, as ue8m0 checkpoints have them.
    return 2.0 ** round(math.log2(x))


@torch.no_grad()
def fill_random_weights(model: DeepseekV32ForCausalLM, seed: int) -> None:
    """Random weights in place, every parameter: FP8 codes with block scales giving N(0, 1/fan_in) weights,
    float matrices N(0, 1/fan_in) (the embedding N(0, 1)), norm weights 1, biases 0."""
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    gen = torch.Generator(device=device).manual_seed(seed)
    done: set[str] = set()
    for name, p in params.items():
        if p.dtype == torch.float8_e4m3fn:
            _fill_fp8(p, gen)
            # Linear: x.weight -> x.weight_scale_inv; stacked experts: experts.w1 -> experts.w1_scale.
            scale_name = name + "_scale_inv" if name.endswith(".weight") else name + "_scale"
            params[scale_name].fill_(_pow2(p.shape[-1] ** -0.5 / FP8_CODE_STD))
            done |= {name, scale_name}
    for name, p in params.items():
        if name in done:
            continue
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(("bias", "e_score_correction_bias")):
            p.zero_()
        elif p.dim() == 2:
            std = 1.0 if name.endswith("embed_tokens.weight") else p.shape[1] ** -0.5
            for start in range(0, p.shape[0], max(1, CHUNK // p.shape[1])):
                rows = p[start : start + max(1, CHUNK // p.shape[1])]
                rows.copy_(_randn(tuple(rows.shape), gen, device).mul_(std))
        else:
            raise RuntimeError(f"no random fill rule for parameter {name} {tuple(p.shape)} {p.dtype}")


def build_model(cfg: ModelConfig, device: torch.device, seed: int) -> DeepseekV32ForCausalLM:
    """The model allocated directly on ``device`` (no host copy of the weights) with random weights."""
    with torch.device(device):
        model = DeepseekV32ForCausalLM(cfg, torch.bfloat16)
    fill_random_weights(model, seed)
    return model.eval()


def set_index_topk(model: DeepseekV32ForCausalLM, k: int) -> None:
    """Switch every layer to ``index_topk = k`` (the weights do not depend on it; rebuilding tens of GB of
    weights per mode would take longer than the timing)."""
    cfg = dataclasses.replace(model.cfg, index_topk=k)
    model.cfg = cfg
    for layer in model.model.layers:
        layer.self_attn.cfg = cfg
        layer.self_attn.indexer.topk = k


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def weight_bytes(model: DeepseekV32ForCausalLM) -> dict[str, int]:
    """Bytes of each kind of weight per layer (what the 61-layer extrapolation scales)."""
    layers = list(model.model.layers)
    out = {"attention_per_layer": module_bytes(layers[0].self_attn)}
    dense = [x for x in layers if not isinstance(x.mlp, MoE)]
    moe = [x for x in layers if isinstance(x.mlp, MoE)]
    if dense:
        out["dense_mlp_per_layer"] = module_bytes(dense[0].mlp)
    if moe:
        m = moe[0].mlp
        out["moe_routed_per_layer"] = module_bytes(m.experts)
        out["moe_shared_per_layer"] = module_bytes(m.shared_experts) if m.shared_experts is not None else 0
        out["moe_router_per_layer"] = module_bytes(m.gate)
    out["total"] = module_bytes(model)
    return out


# ----- caches and metadata -----


def kv_bytes_per_token_layer(cfg: ModelConfig, spec: CacheSpec) -> int:
    """MLA + indexer cache bytes of one token in one layer (1152 + 132 for bf16, 656 + 132 for FP8)."""
    return KVPool.bytes_per_token(cfg, spec, torch.bfloat16) // cfg.num_hidden_layers


def pages_per_seq(context: int, page_size: int) -> int:
    return -(-context // page_size)


def workspace_bytes(batch: int, context: int) -> int:
    """Activation / graph-pool memory of one decode step beyond the weights and caches, with margin: the
    indexer logits [B, C] fp32 and top-k buffers, the dense path's position and slot tensors [B, C] int64, the
    split-KV partials of sparse MLA, plus 2 GB for cuBLAS/Triton workspaces and the allocator."""
    return 16 * 8 * batch * context + batch * 32 * 128 * 512 * 4 + 2 * 10**9


@dataclass
class Plan:
    """Memory plan of one (kv dtype, batch, context) case."""

    kv_dtype: str
    batch: int
    context: int
    kv_per_token_layer: int
    kv_bytes_per_layer: int
    layers: int  # decoder layers of the slice
    cache_layers: int  # distinct layer caches: ``layers``, or 1 shared by every layer
    need_bytes: int  # caches + workspace
    skip: str | None = None

    @property
    def shared_kv(self) -> bool:
        return self.skip is None and self.cache_layers < self.layers


def plan_case(cfg: ModelConfig, spec: CacheSpec, batch: int, context: int, weights: int, budget: int) -> Plan:
    """Distinct caches per layer when they fit in ``budget - weights``, else one cache shared by every layer,
    else a skip with the reason."""
    per_tok = kv_bytes_per_token_layer(cfg, spec)
    pages = batch * pages_per_seq(context, spec.page_size) + 1
    per_layer = pages * spec.page_size * per_tok
    work = workspace_bytes(batch, context)
    room = budget - weights
    n = cfg.num_hidden_layers
    plan = Plan(spec.kv_cache_dtype, batch, context, per_tok, per_layer, n, n, n * per_layer + work)
    if plan.need_bytes <= room:
        return plan
    plan.cache_layers, plan.need_bytes = 1, per_layer + work
    if plan.need_bytes > room:
        plan.skip = (
            f"needs {per_layer / GB:.1f} GB of KV for one layer ({batch} x {context} tokens x {per_tok} B) + "
            f"{work / GB:.1f} GB workspace, {room / GB:.1f} GB left after {weights / GB:.1f} GB of weights"
        )
    return plan


@torch.no_grad()
def fill_random_cache(cache: LayerCache, gen: torch.Generator) -> None:
    """Random rows in every slot: latents ~ N(0, 1) (as after kv_a_layernorm), rope keys ~ N(0, 1), indexer keys
    as FP8 codes with power-of-two scales (or bf16 keys when unquantized)."""
    mla, index = cache.mla, cache.index
    device = mla.storage.device
    flat = mla.flat
    if mla.layout == "fp8":
        rows_per_chunk = max(1, CHUNK // flat.shape[1])
        for start in range(0, flat.shape[0], rows_per_chunk):
            n = min(rows_per_chunk, flat.shape[0] - start)
            latent = _randn((n, mla.kv_lora_rank), gen, device)
            flat[start : start + n] = pack_fp8_kv(latent, _randn((n, mla.rope_dim), gen, device))
    else:
        rows_per_chunk = max(1, CHUNK // flat.shape[1])
        for start in range(0, flat.shape[0], rows_per_chunk):
            n = min(rows_per_chunk, flat.shape[0] - start)
            flat[start : start + n] = _randn((n, flat.shape[1]), gen, device).to(flat.dtype)
    if index.quantized:
        pages_per_chunk = max(1, CHUNK // (index.page_size * index.head_dim))
        for start in range(0, index.keys.shape[0], pages_per_chunk):
            keys = index.keys[start : start + pages_per_chunk]
            keys.copy_(_randn(tuple(keys.shape), gen, device).mul_(FP8_CODE_STD).to(keys.dtype))
        index.scales.fill_(1.0 / FP8_CODE_STD)
    else:
        keys = index.storage.view(-1, index.head_dim)
        for start in range(0, keys.shape[0], max(1, CHUNK // index.head_dim)):
            chunk = keys[start : start + max(1, CHUNK // index.head_dim)]
            chunk.copy_(_randn(tuple(chunk.shape), gen, device))


def decode_metadata(
    pool: KVPool, batch: int, context: int, device: torch.device, seed: int
) -> AttentionMetadata:
    """One decode token per sequence at position ``context - 1`` (so ``context`` keys, the new one included),
    each sequence owning ceil(context / page) pages drawn at random from the pool, as after real traffic."""
    per_seq = pages_per_seq(context, pool.page_size)
    pages = torch.tensor(pool.allocate(batch * per_seq))
    pages = pages[torch.randperm(pages.numel(), generator=torch.Generator().manual_seed(seed))]
    chunks = [SeqChunk(context - 1, 1, pages[b * per_seq : (b + 1) * per_seq].tolist()) for b in range(batch)]
    return build_metadata(chunks, pool.page_size, device)


# ----- op tables -----


def all_positions_topk(
    q: torch.Tensor, weights: torch.Tensor, cache: Any, meta: AttentionMetadata, topk: int
) -> torch.Tensor:
    """``indexer_topk_decode`` for a fully dense step: every visible position (0..pos) of each token's
    sequence, -1 after, without scoring (what the real op returns, in another order, when topk >= seq_len)."""
    pos = torch.arange(topk, device=meta.positions.device, dtype=torch.int32)
    return torch.where(pos[None, :] <= meta.positions[:, None], pos[None, :], -1)


def replace_kernel(ops: OpTable, op: str, name: str, fn: Callable[..., Any]) -> OpTable:
    kernels = dict(ops.kernels)
    kernels[op] = Kernel(op=op, name=name, fn=fn, description="slice benchmark stand-in")
    return OpTable(kernels)


class Recorder:
    """Wraps chosen ops of a table to keep the arguments of their last call (to time the op alone)."""

    def __init__(self, ops: OpTable, names: tuple[str, ...]) -> None:
        self.calls: dict[str, tuple[Callable[..., Any], tuple, dict]] = {}
        kernels = dict(ops.kernels)
        for op in names:
            kernels[op] = dataclasses.replace(kernels[op], fn=self._wrap(op, kernels[op].fn))
        self.ops = OpTable(kernels)

    def _wrap(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[op] = (fn, args, kwargs)
            return fn(*args, **kwargs)

        return call


def parse_kernel_choices(items: list[str]) -> dict[str, str]:
    """``op=name`` pairs (repeatable and/or comma-separated) -> {op: name}."""
    out: dict[str, str] = {}
    for item in items:
        for pair in item.split(","):
            if not pair.strip():
                continue
            op, sep, name = pair.partition("=")
            if not sep or not op.strip() or not name.strip():
                raise SystemExit(f"--kernels takes op=name pairs, got {pair!r}")
            out[op.strip()] = name.strip()
    return out


# ----- timing -----


class Timer:
    """Median milliseconds of a zero-argument callable, eagerly and/or as a CUDA graph replay."""

    def __init__(self, device: torch.device, modes: tuple[str, ...], rep_ms: float, cpu_reps: int) -> None:
        self.device = device
        self.modes = modes
        self.rep_ms = rep_ms
        self.cpu_reps = cpu_reps

    def _bench(self, fn: Callable[[], Any]) -> float:
        if self.device.type != "cuda":
            fn()  # warm-up (lazy caches such as the absorbed MLA weights)
            times = []
            for _ in range(self.cpu_reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=self.rep_ms, return_mode="median"))

    def eager(self, fn: Callable[[], Any]) -> float | str:
        """Eager time of ``fn``; the error text when it raises (the other figures of the case still run)."""
        try:
            return round(self._bench(fn), 4)
        except Exception as exc:
            traceback.print_exc()
            _free(self.device)
            return f"error: {type(exc).__name__}: {str(exc)[:200]}"

    def graph(self, fn: Callable[[], Any]) -> float | str:
        """Replay time of ``fn`` captured in a CUDA graph; the error text when it cannot be captured."""
        from dsv_cuda.graphs import cuda_graph

        try:
            replay, out = cuda_graph(fn, self.device)
        except Exception as exc:  # reported in the results, never replaced by the eager figure
            traceback.print_exc()
            _free(self.device)
            return f"capture failed: {type(exc).__name__}: {str(exc)[:200]}"
        try:
            return self.eager(replay)
        finally:
            del replay, out

    def measure(self, fn: Callable[[], Any]) -> dict[str, float | str]:
        """{"eager": ms, "graph": ms or error} for the configured modes; eager first, so that Triton compiles
        (and lazy caches fill) on the main stream before any capture."""
        out: dict[str, float | str] = {}
        if "eager" in self.modes:
            out["eager"] = self.eager(fn)
        if "graph" in self.modes:
            out["graph"] = self.graph(fn)
        return out


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----- the runs -----


def attn_block(layer: DecoderLayer) -> Callable[..., torch.Tensor]:
    """h + self_attn(input_layernorm(h)): the first half of DecoderLayer.forward."""

    def fn(
        h: torch.Tensor, rope: Any, meta: AttentionMetadata, cache: LayerCache, ops: OpTable
    ) -> torch.Tensor:
        return h + layer.self_attn(layer.input_layernorm(h, ops), rope, meta, cache, ops)

    return fn


def mlp_block(layer: DecoderLayer, h: torch.Tensor, ops: OpTable) -> torch.Tensor:
    """h + mlp(post_attention_layernorm(h)): the second half of DecoderLayer.forward."""
    return h + layer.mlp(layer.post_attention_layernorm(h, ops), ops)


def ep_shard_block(
    layer: DecoderLayer, ep: int, batch: int, gen: torch.Generator
) -> Callable[[torch.Tensor, OpTable], tuple[torch.Tensor, torch.Tensor | None]]:
    """One GPU's MoE work under expert parallelism over ``ep`` GPUs with ``batch`` tokens per GPU (communication
    excluded): router + routing of its own tokens, the shared expert on them, and its E/ep experts on the
    ``top_k * batch`` rows routed to it from all GPUs (balanced routing, each row to one local expert)."""
    moe = layer.mlp
    assert isinstance(moe, MoE)
    cfg = moe.cfg
    n_local = max(1, cfg.n_routed_experts // ep)
    e = moe.experts
    local = ExpertWeights(
        e.w1[:n_local],
        e.w3[:n_local],
        e.w2[:n_local],
        None if e.w1_scale is None else e.w1_scale[:n_local],
        None if e.w3_scale is None else e.w3_scale[:n_local],
        None if e.w2_scale is None else e.w2_scale[:n_local],
        e.block,
        e.act_scale_fmt,
    )
    device = e.w1.device
    rows = cfg.num_experts_per_tok * batch
    received = _randn((rows, cfg.hidden_size), gen, device)
    ids = torch.randint(0, n_local, (rows, 1), generator=gen, device=device)
    route_w = torch.ones(rows, 1, device=device)

    def fn(h: torch.Tensor, ops: OpTable) -> torch.Tensor:
        x = layer.post_attention_layernorm(h, ops)
        logits = torch.nn.functional.linear(x.float(), moe.gate.weight.float())
        ops.moe_route(
            logits,
            moe.gate.e_score_correction_bias,
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group,
            cfg.norm_topk_prob,
            cfg.routed_scaling_factor,
        )
        y = ops.fused_moe(received, route_w, ids, local)
        shared = moe.shared_experts(x, ops) if moe.shared_experts is not None else None
        return y, shared

    return fn


@dataclass
class Settings:
    """Everything a run needs besides the model."""

    device: torch.device
    backend: Any
    choices: dict[str, str]
    kv_dtypes: list[str]
    batches: list[int]
    contexts: list[int]
    modes: list[str]
    dsa_topk: int
    page_size: int
    indexer_quant: str
    dense_indexer: str
    ep: int
    head_vocab: int
    budget: int
    deadline: float
    timer: Timer
    seed: int
    out: str | None = None

    def save(self, results: dict[str, Any]) -> None:
        """Write what is measured so far (a run cut short by the device's time limit still leaves its cases)."""
        if self.out:
            with open(self.out, "w") as f:
                json.dump(results, f, indent=1)


def ops_for(s: Settings, kv_dtype: str) -> OpTable:
    config = {
        "kv_cache_dtype": kv_dtype,
        "page_size": s.page_size,
        "indexer_quant": s.indexer_quant,
        "dtype": "bfloat16",
    }
    return s.backend.ops(s.choices, config)


@torch.inference_mode()
def per_batch_blocks(model: DeepseekV32ForCausalLM, s: Settings, ops: OpTable) -> list[dict[str, Any]]:
    """MLP-side blocks, which depend on the batch only: dense MLP, MoE on one GPU, one EP shard, lm_head."""
    cfg = model.cfg
    layers = list(model.model.layers)
    dense = next((x for x in layers if not isinstance(x.mlp, MoE)), None)
    moe = next((x for x in layers if isinstance(x.mlp, MoE)), None)
    gen = torch.Generator(device=s.device).manual_seed(s.seed + 1)
    head = _randn((s.head_vocab, cfg.hidden_size), gen, s.device).mul_(cfg.hidden_size**-0.5)
    out = []
    for b in s.batches:
        h = _randn((b, cfg.hidden_size), gen, s.device)
        row: dict[str, Any] = {"batch": b}
        if dense is not None:
            row["dense_mlp_ms"] = s.timer.measure(lambda dense=dense, h=h: mlp_block(dense, h, ops))
        if moe is not None:
            row["moe_mlp_ms"] = s.timer.measure(lambda moe=moe, h=h: mlp_block(moe, h, ops))
            shard = ep_shard_block(moe, s.ep, b, gen)
            row["moe_ep_shard_ms"] = s.timer.measure(lambda shard=shard, h=h: shard(h, ops))
        # The engine's greedy path runs the head GEMM in bf16 (ModelRunner.greedy_tokens).
        row["lm_head_ms"] = s.timer.measure(lambda h=h: torch.nn.functional.linear(h, head))
        out.append(row)
        _free(s.device)
    return out


@torch.inference_mode()
def run_case(
    model: DeepseekV32ForCausalLM, s: Settings, plan: Plan, ops: OpTable, gen: torch.Generator
) -> list[dict[str, Any]]:
    """Both attention modes of one (kv dtype, batch, context): fill the caches once, time each mode."""
    cfg = model.cfg
    spec = CacheSpec(s.page_size, plan.kv_dtype, s.indexer_quant)
    pool_cfg = dataclasses.replace(cfg, num_hidden_layers=plan.cache_layers)
    pages = plan.batch * pages_per_seq(plan.context, s.page_size) + 1
    pool = KVPool(pool_cfg, spec, pages, torch.bfloat16, s.device)
    for cache in pool.layers:
        fill_random_cache(cache, gen)
    caches = pool.layers if plan.cache_layers > 1 else pool.layers * cfg.num_hidden_layers
    meta = decode_metadata(pool, plan.batch, plan.context, s.device, s.seed)
    ids = torch.randint(0, cfg.vocab_size, (plan.batch,), generator=gen, device=s.device)
    rope = model.rope_tables(meta.positions)
    h = model.model.embed_tokens(ids)
    rows = []
    try:
        for mode in s.modes:
            if mode == "dsa":
                if plan.context <= s.dsa_topk:
                    rows.append(
                        _row(plan, mode, skip=f"context {plan.context} <= index_topk {s.dsa_topk}: dense")
                    )
                    continue
                set_index_topk(model, s.dsa_topk)
                mode_ops = ops
            else:
                set_index_topk(model, plan.context)
                mode_ops = (
                    replace_kernel(ops, "indexer_topk_decode", "all_positions", all_positions_topk)
                    if s.dense_indexer == "skip"
                    else ops
                )
            try:
                rows.append(time_mode(model, s, plan, mode, mode_ops, ids, meta, caches, h, rope))
            except Exception as exc:  # e.g. out of memory in the dense 128K case: the other mode still counts
                traceback.print_exc()
                rows.append(_row(plan, mode, f"error: {type(exc).__name__}: {str(exc)[:300]}"))
            _free(s.device)
    finally:  # the next case and the MLP blocks expect the DSA configuration
        set_index_topk(model, s.dsa_topk)
    return rows  # the pool and its caches are freed with this frame; the caller empties the allocator cache


def time_mode(
    model: DeepseekV32ForCausalLM,
    s: Settings,
    plan: Plan,
    mode: str,
    ops: OpTable,
    ids: torch.Tensor,
    meta: AttentionMetadata,
    caches: list[LayerCache],
    h: torch.Tensor,
    rope: Any,
) -> dict[str, Any]:
    """The figures of one mode: the step, layer 0's attention block, and its indexer and sparse-MLA ops alone."""
    block = attn_block(model.model.layers[0])
    row = _row(plan, mode)
    # Random weights must still give finite activations (NaNs would change what top-k and routing do).
    row["finite"] = bool(torch.isfinite(model(ids, meta, caches, ops)).all())
    row["step_ms"] = s.timer.measure(lambda: model(ids, meta, caches, ops))
    row["attn_ms"] = s.timer.measure(lambda: block(h, rope, meta, caches[0], ops))
    rec = Recorder(ops, ("indexer_topk_decode", "sparse_mla_decode"))
    block(h, rope, meta, caches[0], rec.ops)
    for op, key in (("indexer_topk_decode", "indexer_ms"), ("sparse_mla_decode", "sparse_mla_ms")):
        fn, args, kwargs = rec.calls[op]
        row[key] = s.timer.eager(lambda fn=fn, args=args, kwargs=kwargs: fn(*args, **kwargs))
    row["topk"] = int(rec.calls["sparse_mla_decode"][1][2].shape[1])  # (q, cache, slots, scale)
    return row


def _row(plan: Plan, mode: str, skip: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "kv_dtype": plan.kv_dtype,
        "batch": plan.batch,
        "context": plan.context,
        "mode": mode,
        "kv_bytes_per_layer": plan.kv_bytes_per_layer,
        "shared_kv": plan.shared_kv,
    }
    if skip is not None:
        row["skip"] = skip
    return row


def run(model: DeepseekV32ForCausalLM, s: Settings) -> dict[str, Any]:
    cfg = model.cfg
    weights = weight_bytes(model)
    resident = torch.cuda.memory_allocated(s.device) if s.device.type == "cuda" else weights["total"]
    results: dict[str, Any] = {"weights_bytes": weights, "resident_bytes": resident, "kv": {}, "cases": []}
    gen = torch.Generator(device=s.device).manual_seed(s.seed)
    print(
        f"weights {weights['total'] / GB:.2f} GB ({resident / GB:.2f} GB resident); budget {s.budget / GB:.0f} GB"
    )
    for kv_dtype in s.kv_dtypes:
        spec = CacheSpec(s.page_size, kv_dtype, s.indexer_quant)
        per_tok = kv_bytes_per_token_layer(cfg, spec)
        results["kv"][kv_dtype] = {"bytes_per_token_layer": per_tok}
        ops = ops_for(s, kv_dtype)
        results["kv"][kv_dtype]["kernels"] = ops.describe()
        print(f"\n[{kv_dtype}] KV {per_tok} B/token/layer; kernels: {ops.describe()}")
        if "mlp" not in results:  # MLP blocks do not read the KV cache: time them once
            results["mlp"] = per_batch_blocks(model, s, ops)
            _free(s.device)
        for b in s.batches:
            for c in s.contexts:
                plan = plan_case(cfg, spec, b, c, resident, s.budget)
                if plan.skip is None and s.device.type == "cuda":
                    free = torch.cuda.mem_get_info(s.device)[0]
                    if plan.need_bytes > free:
                        plan.skip = (
                            f"needs {plan.need_bytes / GB:.1f} GB, the GPU has {free / GB:.1f} GB free"
                        )
                if plan.skip is None and time.monotonic() > s.deadline:
                    plan.skip = "time budget (--time-budget-s) spent before this case"
                if plan.skip is not None:
                    results["cases"] += [_row(plan, m, plan.skip) for m in s.modes]
                    print(f"  B={b} C={c}: skipped: {plan.skip}")
                    continue
                t0 = time.monotonic()
                try:
                    rows = run_case(model, s, plan, ops, gen)
                except Exception as exc:  # one failing case (e.g. out of memory) must not stop the others
                    rows = [_row(plan, m, f"error: {type(exc).__name__}: {str(exc)[:300]}") for m in s.modes]
                    traceback.print_exc()
                _free(s.device)
                results["cases"] += rows
                s.save(results)
                for r in rows:
                    print("  " + _case_line(r), f"({time.monotonic() - t0:.1f}s)")
    return results


# ----- extrapolation to the full model on 8 GPUs (docs/h200-slice.md) -----


@dataclass(frozen=True)
class Deployment:
    """The full model served with attention data-parallel and the MoE expert-parallel over ``ep`` GPUs.

    Attributes:
        layers, dense_layers: 61 and 3 for V3.2 (the MTP layer is not counted: no speculative decoding).
        ep: GPUs; each holds every attention and dense-MLP weight, 1/ep of the routed experts, the shared expert.
        a2a_gbps: effective per-GPU, per-direction all-to-all bandwidth (NVLink 4: 450 GB/s peak).
        a2a_latency_us: fixed cost of one dispatch or one combine (launch + synchronization).
        hbm_gb: usable device memory (an H200 reports ~150 GB); reserve_gb: activations, CUDA graphs, NCCL and
            dispatch buffers.
    """

    layers: int = 61
    dense_layers: int = 3
    ep: int = 8
    a2a_gbps: float = 300.0
    a2a_latency_us: float = 20.0
    hbm_gb: float = 150.0
    reserve_gb: float = 8.0
    vocab: int = 129280


def a2a_ms(cfg: ModelConfig, dep: Deployment, batch: int) -> float:
    """Dispatch + combine time of one MoE layer for ``batch`` tokens per GPU.

    Each token goes once to every GPU holding one of its experts: with n_group == ep the expert groups are the
    GPUs and a token reaches at most topk_group of them (4 for V3.2), (ep-1)/ep of which are remote. Dispatch
    sends FP8 hidden states with their 1x128 scales, combine returns bf16.
    """
    d = cfg.hidden_size
    gpus = min(cfg.topk_group, dep.ep) if cfg.n_group == dep.ep else min(cfg.num_experts_per_tok, dep.ep)
    remote = gpus * (dep.ep - 1) / dep.ep
    per_token = d + d // 128 * 4 + 2 * d
    return 2 * dep.a2a_latency_us / 1e3 + batch * remote * per_token / (dep.a2a_gbps * 1e9) * 1e3


def full_model_bytes(cfg: ModelConfig, weights: dict[str, int], dep: Deployment) -> dict[str, float]:
    """Per-GPU weight bytes of the full model under ``dep`` and the memory left for KV."""
    moe_layers = dep.layers - dep.dense_layers
    per_gpu = (
        dep.layers * weights["attention_per_layer"]
        + dep.dense_layers * weights.get("dense_mlp_per_layer", 0)
        + moe_layers
        * (
            weights.get("moe_routed_per_layer", 0) / dep.ep
            + weights.get("moe_shared_per_layer", 0)
            + weights.get("moe_router_per_layer", 0)
        )
        + 2 * dep.vocab * cfg.hidden_size * 2  # bf16 embedding + lm_head
    )
    return {"weights_per_gpu": per_gpu, "kv_room_per_gpu": dep.hbm_gb * GB - per_gpu - dep.reserve_gb * GB}


def _key(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "kv_dtype": r["kv_dtype"],
        "batch_per_gpu": r["batch"],
        "context": r["context"],
        "mode": r["mode"],
    }


def extrapolate(cfg: ModelConfig, results: dict[str, Any], dep: Deployment, key: str) -> list[dict[str, Any]]:
    """Step time of the full model per GPU from the slice's blocks:

    T = layers * attn(B, C) + dense_layers * dense_mlp(B) + moe_layers * (moe_ep_shard(B) + a2a(B)) + lm_head(B)

    with B sequences per GPU; throughput = ep * B / T. ``fits`` says whether B x C tokens of KV fit per GPU.
    """
    mem = full_model_bytes(cfg, results["weights_bytes"], dep)
    mlp = {r["batch"]: r for r in results.get("mlp", [])}
    moe_layers = dep.layers - dep.dense_layers
    out = []
    for r in results["cases"]:
        m = mlp.get(r["batch"])
        if "skip" in r or m is None:
            continue
        # One timing kind throughout (graph replays when measured): a failed capture leaves the row out, with why.
        named = {
            "attn": r["attn_ms"],
            "dense_mlp": m.get("dense_mlp_ms", {}),  # absent when the slice has no dense / MoE layer
            "moe_ep_shard": m.get("moe_ep_shard_ms", {}),
            "lm_head": m["lm_head_ms"],
        }
        missing = [n for n, v in named.items() if not isinstance(v.get(key), float)]
        if missing:
            out.append({**_key(r), "error": f"no {key} time for {', '.join(missing)}"})
            continue
        attn, dense, shard, head = (v[key] for v in named.values())
        comm = a2a_ms(cfg, dep, r["batch"])
        step = dep.layers * attn + dep.dense_layers * dense + moe_layers * (shard + comm) + head
        kv_need = (
            r["batch"] * r["context"] * dep.layers * results["kv"][r["kv_dtype"]]["bytes_per_token_layer"]
        )
        out.append(
            {
                **_key(r),
                "step_ms": round(step, 3),
                "attn_share": round(dep.layers * attn / step, 3),
                "a2a_ms_per_layer": round(comm, 4),
                "tok_s_total": round(dep.ep * r["batch"] / step * 1e3, 1),
                "tok_s_per_seq": round(1e3 / step, 1),
                "kv_gb_per_gpu": round(kv_need / GB, 1),
                "fits": kv_need <= mem["kv_room_per_gpu"],
            }
        )
    return out


# ----- output -----


def _ms(v: Any) -> str:
    if isinstance(v, dict):
        return "/".join(_ms(v.get(k)) for k in ("graph", "eager") if k in v)
    if isinstance(v, float):
        return f"{v:.3f}"
    return "-" if v is None else "err"


def _case_line(r: dict[str, Any]) -> str:
    head = f"{r['kv_dtype']:>8} B={r['batch']:<4} C={r['context']:<7} {r['mode']:<5}"
    if "skip" in r:
        return f"{head} skipped: {r['skip']}"
    return (
        f"{head} step {_ms(r['step_ms'])} ms, attn {_ms(r['attn_ms'])} ms, indexer {_ms(r['indexer_ms'])}, "
        f"sparse_mla {_ms(r['sparse_mla_ms'])} (top {r['topk']}){' shared KV' if r['shared_kv'] else ''}"
    )


def print_tables(results: dict[str, Any], n_layers: int, timing: tuple[str, ...]) -> None:
    """Markdown tables: per case (step, per layer, attention, ops), per batch (MLP-side blocks)."""
    key = "graph" if "graph" in timing else "eager"

    def pick(v: Any) -> Any:
        return v.get(key) if isinstance(v, dict) else v

    print(
        f"\nTimes in ms ({key}{' (eager in brackets)' if len(timing) > 1 else ''}); context = keys attended."
    )
    print("| KV | batch | context | mode | step | step / layer | attn block | indexer op | sparse MLA op |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["cases"]:
        cells = [r["kv_dtype"], str(r["batch"]), str(r["context"]), r["mode"]]
        if "skip" in r:
            print("| " + " | ".join(cells) + f" | skipped: {r['skip']} |||||")
            continue
        step = pick(r["step_ms"])
        per_layer = step / n_layers if isinstance(step, float) else None
        both = len(timing) > 1
        cells += [
            _ms(step) + (f" ({_ms(r['step_ms'].get('eager'))})" if both else ""),
            _ms(per_layer),
            _ms(pick(r["attn_ms"])) + (f" ({_ms(r['attn_ms'].get('eager'))})" if both else ""),
            _ms(r["indexer_ms"]) if r["mode"] == "dsa" else "-",
            _ms(r["sparse_mla_ms"]) + f" (top {r['topk']})",
        ]
        print("| " + " | ".join(cells) + (" (shared KV)" if r["shared_kv"] else "") + " |")
    print("\n| batch | dense MLP block | MoE block (all experts) | MoE EP shard | lm_head (full vocab) |")
    print("|---|---|---|---|---|")
    for r in results.get("mlp", []):
        cells = [str(r["batch"])] + [
            _ms(pick(r.get(k))) for k in ("dense_mlp_ms", "moe_mlp_ms", "moe_ep_shard_ms", "lm_head_ms")
        ]
        print("| " + " | ".join(cells) + " |")


def print_extrapolation(results: dict[str, Any], dep: Deployment) -> None:
    d = results["deployment"]
    print(
        f"\nFull model ({dep.layers} layers) on {dep.ep} GPUs, DP-attention + EP{dep.ep}: "
        f"{d['weights_per_gpu'] / GB:.1f} GB weights and {d['kv_room_per_gpu'] / GB:.1f} GB for KV per GPU; "
        f"all-to-all at {dep.a2a_gbps:.0f} GB/s + {dep.a2a_latency_us:.0f} us per dispatch/combine, no overlap."
    )
    print(
        "| KV | batch/GPU | context | mode | step ms | tok/s (all GPUs) | tok/s/seq | attn share | KV GB/GPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for e in results["extrapolation"]:
        if "error" in e:
            print(
                f"| {e['kv_dtype']} | {e['batch_per_gpu']} | {e['context']} | {e['mode']} | {e['error']} |||||"
            )
            continue
        kv = f"{e['kv_gb_per_gpu']}" + ("" if e["fits"] else " (does not fit)")
        print(
            f"| {e['kv_dtype']} | {e['batch_per_gpu']} | {e['context']} | {e['mode']} | {e['step_ms']:.2f} | "
            f"{e['tok_s_total']:.0f} | {e['tok_s_per_seq']:.1f} | {e['attn_share']:.2f} | {kv} |"
        )


def _csv(text: str, kind: type = int) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny widths, small contexts, CPU reference backend")
    p.add_argument("--device", default=None, help="backend name: cuda (default) or cpu (default with --tiny)")
    p.add_argument("--dense-layers", type=int, default=1)
    p.add_argument("--moe-layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary of the slice (memory only)")
    p.add_argument("--batches", default=None, help="comma list (default 1,32,128; tiny 1,3)")
    p.add_argument(
        "--contexts", default=None, help="comma list of keys per sequence (default 4096,32768,131072)"
    )
    p.add_argument("--modes", default="dsa,dense", help="comma list of dsa, dense")
    p.add_argument("--kv-cache-dtype", default="bf16", help="comma list of bf16, fp8_e4m3 (auto = bf16)")
    p.add_argument("--indexer-quant", choices=["fp8", "none"], default="fp8")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument(
        "--dense-indexer",
        choices=["skip", "run"],
        default="skip",
        help="dense mode: skip the indexer scoring (every position is selected anyway) or run it (top-k = C)",
    )
    p.add_argument("--kernels", action="append", default=[], help="op=name overrides, e.g. fused_moe=triton")
    p.add_argument(
        "--timing", default=None, help="comma list of graph, eager (default both on cuda, eager on cpu)"
    )
    p.add_argument("--ep", type=int, default=8, help="expert-parallel size of the MoE shard timing")
    p.add_argument("--a2a-gbps", type=float, default=300.0, help="extrapolation: all-to-all GB/s per GPU")
    p.add_argument(
        "--a2a-latency-us", type=float, default=20.0, help="extrapolation: us per dispatch/combine"
    )
    p.add_argument(
        "--hbm-gb",
        type=float,
        default=None,
        help="extrapolation: memory per GPU (default: this GPU's, else 150)",
    )
    p.add_argument("--head-vocab", type=int, default=None, help="lm_head rows timed (default V3.2's 129280)")
    p.add_argument("--mem-budget-gb", type=float, default=120.0, help="weights + caches + workspace (1e9 B)")
    p.add_argument("--time-budget-s", type=float, default=330.0, help="no new case starts after this")
    p.add_argument("--rep-ms", type=float, default=60.0, help="do_bench measuring time per figure")
    p.add_argument("--cpu-reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log even if the run is killed
    from dsv.backend.registry import select_backend

    name = args.device or ("cpu" if args.tiny else "cuda")
    backend = select_backend(name)
    device = torch.device(backend.capabilities().torch_device)
    if args.tiny:
        base, batches, contexts, head_vocab = TINY_CONFIG, "1,3", "48,100", TINY_CONFIG["vocab_size"]
    else:
        base, batches, contexts, head_vocab = (
            V32_CONFIG,
            "1,32,128",
            "4096,32768,131072",
            V32_CONFIG["vocab_size"],
        )
    timing = (
        tuple(_csv(args.timing, str))
        if args.timing
        else (("graph", "eager") if device.type == "cuda" else ("eager",))
    )
    if any(t not in ("graph", "eager") for t in timing):
        raise SystemExit(f"--timing takes graph and/or eager, got {args.timing!r}")
    if "graph" in timing and device.type != "cuda":
        raise SystemExit("--timing graph needs the cuda backend")
    kv_dtypes = ["bf16" if k == "auto" else k for k in _csv(args.kv_cache_dtype, str)]
    modes = _csv(args.modes, str)
    for m in modes:
        if m not in ("dsa", "dense"):
            raise SystemExit(f"--modes takes dsa and/or dense, got {m!r}")
    cfg = slice_config(
        base, args.dense_layers, args.moe_layers, args.vocab if not args.tiny else base["vocab_size"]
    )
    s = Settings(
        device=device,
        backend=backend,
        choices=parse_kernel_choices(args.kernels),
        kv_dtypes=kv_dtypes,
        batches=_csv(args.batches or batches),
        contexts=_csv(args.contexts or contexts),
        modes=modes,
        dsa_topk=cfg.index_topk,
        page_size=args.page_size,
        indexer_quant=args.indexer_quant,
        dense_indexer=args.dense_indexer,
        ep=args.ep,
        head_vocab=args.head_vocab or head_vocab,
        budget=int(args.mem_budget_gb * GB),
        deadline=start + args.time_budget_s,
        timer=Timer(device, timing, args.rep_ms, args.cpu_reps),
        seed=args.seed,
        out=args.out,
    )
    for kv in kv_dtypes:  # refuse a bad kernel choice before building tens of GB of weights
        ops_for(s, kv)
    t0 = time.monotonic()
    model = build_model(cfg, device, args.seed)
    _free(device)
    build_s = time.monotonic() - t0
    print(
        f"{cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense), hidden {cfg.hidden_size}, "
        f"{cfg.n_routed_experts} experts; built on {device} in {build_s:.1f}s"
    )
    results = run(model, s)
    results["env"] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "backend": backend.name,
        "timing": list(timing),
        "tiny": args.tiny,
        "layers": cfg.num_hidden_layers,
        "dense_layers": cfg.first_k_dense_replace,
        "moe_layers": cfg.num_hidden_layers - cfg.first_k_dense_replace,
        "index_topk": cfg.index_topk,
        "page_size": args.page_size,
        "indexer_quant": args.indexer_quant,
        "dense_indexer": args.dense_indexer,
        "ep": args.ep,
        "head_vocab": s.head_vocab,
        "mem_budget_gb": args.mem_budget_gb,
        "build_s": round(build_s, 2),
        "wall_s": round(time.monotonic() - start, 2),
        "argv": sys.argv[1:] if argv is None else argv,
    }
    print_tables(results, cfg.num_hidden_layers, timing)
    hbm_gb = args.hbm_gb
    if hbm_gb is None:
        hbm_gb = (
            torch.cuda.get_device_properties(device).total_memory / GB if device.type == "cuda" else 150.0
        )
    dep = Deployment(ep=args.ep, a2a_gbps=args.a2a_gbps, a2a_latency_us=args.a2a_latency_us, hbm_gb=hbm_gb)
    key = "graph" if "graph" in timing else "eager"
    results["deployment"] = dataclasses.asdict(dep) | full_model_bytes(cfg, results["weights_bytes"], dep)
    results["extrapolation"] = extrapolate(cfg, results, dep, key)
    print_extrapolation(results, dep)
    print(f"\nwall {results['env']['wall_s']:.1f}s")
    s.save(results)
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
