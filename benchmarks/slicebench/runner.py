"""The cases of a run: per KV dtype, batch and context, fill the caches and time each attention mode."""

from __future__ import annotations

import dataclasses
import time
import traceback
from typing import Any

import torch

from dsv.backend.interface import OpTable
from dsv.engine.kv_pool import CacheSpec, KVPool
from dsv.model.attention import LayerCache
from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM
from dsv.ops.metadata import AttentionMetadata

from .blocks import attn_block, per_batch_blocks
from .caches import (
    Plan,
    decode_metadata,
    fill_random_cache,
    kv_bytes_per_token_layer,
    pages_per_seq,
    plan_case,
)
from .config import GB
from .optables import Recorder, all_positions_topk, ops_for, replace_kernel
from .profile import format_table, kernel_table
from .report import case_line
from .settings import Settings
from .timing import free_memory
from .weights import set_index_topk, weight_bytes


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
                        case_row(plan, mode, skip=f"context {plan.context} <= index_topk {s.dsa_topk}: dense")
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
                rows.append(case_row(plan, mode, f"error: {type(exc).__name__}: {str(exc)[:300]}"))
            free_memory(s.device)
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

    def step() -> torch.Tensor:
        return model(ids, meta, caches, ops)

    def attention() -> torch.Tensor:
        return block(h, rope, meta, caches[0], ops)

    row = case_row(plan, mode)
    # Random weights must still give finite activations (NaNs would change what top-k and routing do).
    row["finite"] = bool(torch.isfinite(step()).all())
    row["step_ms"] = s.timer.measure(step)
    row["attn_ms"] = s.timer.measure(attention)
    rec = Recorder(ops, ("indexer_topk_decode", "sparse_mla_decode"))
    block(h, rope, meta, caches[0], rec.ops)
    for op, key in (("indexer_topk_decode", "indexer_ms"), ("sparse_mla_decode", "sparse_mla_ms")):
        fn, args, kwargs = rec.calls[op]
        row[key] = s.timer.eager(lambda fn=fn, args=args, kwargs=kwargs: fn(*args, **kwargs))
    row["topk"] = int(rec.calls["sparse_mla_decode"][1][2].shape[1])  # (q, cache, slots, scale)
    if s.profile_iters:
        for key, fn in (("attn_profile", attention), ("step_profile", step)):
            row[key] = kernel_table(fn, s.device, s.profile_iters)
            print(format_table(f"{plan.kv_dtype} B={plan.batch} C={plan.context} {mode} {key}", row[key]))
    return row


def case_row(plan: Plan, mode: str, skip: str | None = None) -> dict[str, Any]:
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
            free_memory(s.device)
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
                    results["cases"] += [case_row(plan, m, plan.skip) for m in s.modes]
                    print(f"  B={b} C={c}: skipped: {plan.skip}")
                    continue
                t0 = time.monotonic()
                try:
                    rows = run_case(model, s, plan, ops, gen)
                except Exception as exc:  # one failing case (e.g. out of memory) must not stop the others
                    rows = [
                        case_row(plan, m, f"error: {type(exc).__name__}: {str(exc)[:300]}") for m in s.modes
                    ]
                    traceback.print_exc()
                free_memory(s.device)
                results["cases"] += rows
                s.save(results)
                for r in rows:
                    print("  " + case_line(r), f"({time.monotonic() - t0:.1f}s)")
    return results
