"""Printed output: the progress line of a case and the markdown tables of the results."""

from __future__ import annotations

from typing import Any

from .config import GB
from .extrapolate import Deployment


def _ms(v: Any) -> str:
    if isinstance(v, dict):
        return "/".join(_ms(v.get(k)) for k in ("graph", "eager") if k in v)
    if isinstance(v, float):
        return f"{v:.3f}"
    return "-" if v is None else "err"


def case_line(r: dict[str, Any]) -> str:
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
