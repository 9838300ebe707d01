#!/usr/bin/env python3
"""Check every available kernel of the CUDA backend against dsv's torch reference on the GPU.

Runs each operation on DeepSeek-V3.2 shapes (576/512 MLA, 64x128 indexer, 128x128 FP8 blocks, top-k 2048),
compares each available kernel of ``CudaBackend`` with the reference op on the same GPU inputs, times it,
then captures decode CUDA graphs of a small model and compares them with eager decode. Prints one table.

    python backends/cuda/scripts/h200_check.py [--ops linear,sparse_mla_decode] [--no-graphs] [--json out.json]

Works from a source checkout without installing dsv or dsv-cuda (it falls back to the source tree).
Exit status 1 when an available kernel fails or disagrees with the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def _bootstrap() -> None:
    """Import dsv and dsv_cuda from the checkout when they are not installed."""
    try:
        import dsv  # noqa: F401
    except ImportError:
        tmp = Path(tempfile.mkdtemp(prefix="dsv-src-"))
        (tmp / "dsv").symlink_to(REPO / "core")
        sys.path.insert(0, str(tmp))
    try:
        import dsv_cuda  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "backends" / "cuda" / "src"))


_bootstrap()

import torch  # noqa: E402

from dsv.backend.reference import REFERENCE_OPS  # noqa: E402
from dsv.engine.batch import SeqChunk, build_metadata  # noqa: E402
from dsv.model.default_model import DEFAULT_MODEL_CONFIG  # noqa: E402
from dsv.ops.kv_cache import IndexKCacheLayer, MLACacheLayer  # noqa: E402
from dsv.ops.moe import ExpertWeights  # noqa: E402
from dsv.ops.quant import act_quant, weight_quant  # noqa: E402

DEV = torch.device("cuda")
BF16 = torch.bfloat16
R, DR, D = 512, 64, 576
TOPK = 2048
ROWS: list[dict] = []


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def randn(*shape, seed=0, scale=1.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed), device=DEV) * scale).to(dtype)


# ----- comparisons -----


def rel_err(out, ref) -> tuple[float, str]:
    out, ref = out.float(), ref.float()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError("non-finite values")
    err = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
    return err, f"rel {err:.2e}"


def topk_recall(out, ref) -> tuple[float, str]:
    """Mean share of the reference's selected positions a kernel also selected (ties may swap a few)."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    recalls = []
    for a, b in zip(out.tolist(), ref.tolist()):
        sa, sb = {x for x in a if x >= 0}, {x for x in b if x >= 0}
        recalls.append(len(sa & sb) / max(len(sb), 1) if sb or sa else 1.0)
    mean = sum(recalls) / len(recalls)
    return 1.0 - mean, f"recall {mean:.4f} (min {min(recalls):.3f})"


def route_cmp(out, ref) -> tuple[float, str]:
    err, _ = rel_err(out[0], ref[0])
    same = torch.equal(out[1].sort(-1).values, ref[1].sort(-1).values)
    return (err if same else 1.0), f"weights rel {err:.2e}, ids {'equal' if same else 'DIFFER'}"


def timed(fn: Callable[[], object], iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


# ----- cases: (op, label, make_args, compare, tolerance) -----


def mla_cache(layout: str, pages: int = 80, seed: int = 1) -> MLACacheLayer:
    cache = MLACacheLayer(pages, 64, R, DR, layout, BF16, DEV)
    n = pages * 64
    cache.write(
        torch.arange(n, device=DEV),
        randn(n, R, seed=seed, dtype=BF16),
        randn(n, DR, seed=seed + 1, dtype=BF16),
    )
    return cache


def sparse_indices(t: int, n_slots: int, seed: int) -> torch.Tensor:
    g = gen(seed)
    idx = torch.rand(t, n_slots, generator=g, device=DEV).argsort(-1)[:, :TOPK]
    idx = idx.masked_fill(torch.rand(t, TOPK, generator=g, device=DEV) < 0.1, -1)
    idx[0, 100:] = -1  # a short sequence
    idx[-1] = -1  # no key at all
    return idx.to(torch.int32)


def sparse_case(layout: str, t: int, h: int):
    def make():
        cache = mla_cache(layout)
        return (randn(t, h, D, seed=3, dtype=BF16), cache, sparse_indices(t, 80 * 64, 4), D**-0.5)

    return make


def linear_case(m: int, n: int, k: int = 7168):
    def make():
        w, s = weight_quant(randn(n, k, seed=5, scale=0.02))
        return (randn(m, k, seed=6, dtype=BF16), w, s, (128, 128), "ue8m0")

    return make


def indexer_case(chunks: list[SeqChunk], heads: int = 64, dim: int = 128):
    def make():
        pages = max(max(c.pages) for c in chunks) + 1
        cache = IndexKCacheLayer(pages, 64, dim, True, BF16, DEV)
        cache.write(torch.arange(pages * 64, device=DEV), randn(pages * 64, dim, seed=7, dtype=BF16))
        meta = build_metadata(chunks, 64, DEV)
        q, q_scale = act_quant(randn(meta.num_tokens, heads, dim, seed=8), dim, "ue8m0")
        w = (
            torch.rand(meta.num_tokens, heads, generator=gen(9), device=DEV)
            * q_scale[..., 0]
            * (heads * dim) ** -0.5
        )
        return (q, w, cache, meta, TOPK)

    return make


def contiguous_chunks(lengths: list[int], news: list[int]) -> list[SeqChunk]:
    chunks, page = [], 1
    for n, new in zip(lengths, news):
        count = -(-n // 64)
        chunks.append(SeqChunk(n - new, new, list(range(page, page + count))))
        page += count
    return chunks


def mha_case():
    def make():
        q = randn(500, 16, 192, seed=10, dtype=BF16)
        k, v = randn(1000, 16, 192, seed=11, dtype=BF16), randn(1000, 16, 128, seed=12, dtype=BF16)
        cu_q = torch.tensor([0, 200, 500], device=DEV)
        cu_k = torch.tensor([0, 700, 1000], device=DEV)  # first sequence: a 200-token chunk on a 500 prefix
        return (q, k, v, cu_q, cu_k, 192**-0.5)

    return make


def moe_case(e: int = 16, d: int = 7168, i: int = 2048, t: int = 64):
    def make():
        ws = {}
        for name, (o, n) in {"w1": (i, d), "w3": (i, d), "w2": (d, i)}.items():
            qs = [weight_quant(randn(o, n, seed=20 + j + len(ws) * e, scale=0.02)) for j in range(e)]
            ws[name] = (torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs]))
        experts = ExpertWeights(
            ws["w1"][0],
            ws["w3"][0],
            ws["w2"][0],
            ws["w1"][1],
            ws["w3"][1],
            ws["w2"][1],
            act_scale_fmt="ue8m0",
        )
        ids = torch.rand(t, e, generator=gen(13), device=DEV).argsort(-1)[:, :8]
        return (randn(t, d, seed=14, dtype=BF16), torch.rand(t, 8, device=DEV), ids, experts)

    return make


def write_case(layout: str):
    def make():
        cache = MLACacheLayer(40, 64, R, DR, layout, BF16, DEV)
        slots = torch.randperm(40 * 64, generator=gen(15), device=DEV)[:300]
        return (cache, slots, randn(300, R, seed=16, dtype=BF16), randn(300, DR, seed=17, dtype=BF16))

    return make


def index_write_case():
    def make():
        cache = IndexKCacheLayer(40, 64, 128, True, BF16, DEV)
        slots = torch.randperm(40 * 64, generator=gen(18), device=DEV)[:300]
        return (cache, slots, randn(300, 128, seed=19, dtype=BF16))

    return make


def cache_after(op: str):
    """For the write ops: compare what the cache reads back at the written slots."""

    def cmp(args_out, args_ref):
        if op == "kv_write":
            return rel_err(args_out[0].read_rows(args_out[1]), args_ref[0].read_rows(args_ref[1]))
        return rel_err(args_out[0].read(args_out[1]), args_ref[0].read(args_ref[1]))

    return cmp


CASES = [
    ("linear", "M=37 N=2048 K=7168", linear_case(37, 2048), rel_err, 2e-2),
    ("linear", "M=1 N=576 K=7168 (ragged N)", linear_case(1, 576), rel_err, 2e-2),
    (
        "rms_norm",
        "37x7168",
        lambda: (randn(37, 7168, seed=2, dtype=BF16), randn(7168, seed=3), 1e-6),
        rel_err,
        1e-2,
    ),
    (
        "moe_route",
        "T=37 E=256 top8 groups 8/4",
        lambda: (randn(37, 256, seed=4), randn(256, seed=5, scale=0.1), 8, 8, 4, True, 2.5),
        route_cmp,
        1e-4,
    ),
    (
        "indexer_topk_prefill",
        "2 seqs: 600 new on 2000, 900",
        indexer_case(contiguous_chunks([2600, 900], [600, 900])),
        topk_recall,
        0.02,
    ),
    (
        "indexer_topk_decode",
        "B=8, ctx 100..5000",
        indexer_case(contiguous_chunks([100, 700, 2047, 2049, 3000, 4000, 4500, 5000], [1] * 8)),
        topk_recall,
        0.02,
    ),
    ("sparse_mla_prefill", "bf16 KV, T=256 H=16", sparse_case("float", 256, 16), rel_err, 2e-2),
    ("sparse_mla_prefill", "fp8 KV, T=256 H=16", sparse_case("fp8", 256, 16), rel_err, 2e-2),
    ("sparse_mla_prefill", "bf16 KV, T=64 H=128", sparse_case("float", 64, 128), rel_err, 2e-2),
    ("sparse_mla_decode", "bf16 KV, T=32 H=16", sparse_case("float", 32, 16), rel_err, 2e-2),
    ("sparse_mla_decode", "fp8 KV, T=32 H=16", sparse_case("fp8", 32, 16), rel_err, 2e-2),
    ("sparse_mla_decode", "fp8 KV, T=32 H=128", sparse_case("fp8", 32, 128), rel_err, 2e-2),
    ("mha_prefill", "2 seqs, 192/128 dims", mha_case(), rel_err, 2e-2),
    ("kv_write", "bf16 layout", write_case("float"), cache_after("kv_write"), 1e-3),
    ("kv_write", "fp8 656-byte layout", write_case("fp8"), cache_after("kv_write"), 1e-2),
    ("index_k_write", "fp8 + scale", index_write_case(), cache_after("index_k_write"), 1e-2),
    ("fused_moe", "E=16 D=7168 I=2048 T=64 top8", moe_case(), rel_err, 3e-2),
]


def record(op, case, kernel, status, metric="", ms=None, note=""):
    ROWS.append(
        {"op": op, "case": case, "kernel": kernel, "status": status, "metric": metric, "ms": ms, "note": note}
    )


def check_kernels(backend, only: set[str] | None, iters: int) -> None:
    kernels = backend.capabilities().kernels
    for op, label, make, compare, tol in CASES:
        if only and op not in only:
            continue
        writes = op in ("kv_write", "index_k_write")
        try:
            ref_args = make()
            ref = REFERENCE_OPS[op](*ref_args)
            torch.cuda.synchronize()
        except Exception as exc:
            record(op, label, "torch", "ERROR", note=f"reference failed: {type(exc).__name__}: {exc}")
            continue
        for k in kernels[op]:
            if not k.available:
                record(op, label, k.name, "unavailable", note=k.reason)
                continue
            try:
                args = make() if writes else ref_args
                out = k.fn(*args)
                torch.cuda.synchronize()
                err, metric = compare(args, ref_args) if writes else compare(out, ref)
                ms = timed(lambda k=k, a=args: k.fn(*a), iters)
                record(op, label, k.name, "ok" if err <= tol else "MISMATCH", metric, ms)
            except Exception as exc:
                record(
                    op, label, k.name, "FAIL", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                )
            finally:
                torch.cuda.synchronize()
        del ref_args, ref
        torch.cuda.empty_cache()


# ----- decode CUDA graphs -----

#: The embedded default model's architecture, dense only (the reference fused_moe cannot be captured: host
#: sync), two layers, a small vocabulary and no MTP layer.
GRAPH_MODEL = dict(
    DEFAULT_MODEL_CONFIG,
    vocab_size=1000,
    num_hidden_layers=2,
    first_k_dense_replace=2,
    num_nextn_predict_layers=0,
)


def random_model(cfg_dict: dict):
    from dsv.config import ModelConfig
    from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM

    cfg = ModelConfig.from_dict(cfg_dict)
    model = DeepseekV32ForCausalLM(cfg, BF16).to(DEV)
    targets = model.checkpoint_targets()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, t in sorted(targets.items()):
            if t is None or name.endswith("weight_scale_inv"):
                continue
            if t.dtype == torch.float8_e4m3fn:
                q, s = weight_quant(torch.randn(t.shape, device=DEV) * 0.05, cfg.quant.block_size)
                t.copy_(q)
                targets[name + "_scale_inv"].copy_(s)
            elif t.dim() > 1:
                t.copy_(torch.randn(t.shape, device=DEV) * 0.05)
            else:
                t.fill_(1.0 if "norm" in name else 0.0)
    model.reset_buffers()
    return model.eval(), cfg


def failed_kernels() -> set[tuple[str, str]]:
    """(op, kernel) pairs that failed or disagreed with the reference earlier in this run."""
    return {(r["op"], r["kernel"]) for r in ROWS if r["status"] in ("FAIL", "MISMATCH")}


def check_graphs(backend, kv_cache_dtype: str, kernels: str, moe: bool = False) -> None:
    """Capture decode graphs with the backend's default kernels (``kernels="defaults"``; a default that
    failed the kernel check above is replaced by torch and named) or with the torch reference for every op
    (``"torch"``: tells runner problems from kernel problems). ``moe`` adds an MoE layer, whose reference
    fused_moe syncs with the host (expected to fail capture with the torch kernels)."""
    from dsv_cuda.graphs import DecodeGraphRunner

    from dsv.engine.kv_pool import CacheSpec, KVPool

    label = f"2-layer {'MoE' if moe else 'dense'} model, {kv_cache_dtype} KV, page 64"
    replaced = ""
    try:
        model, cfg = random_model(dict(GRAPH_MODEL, first_k_dense_replace=1) if moe else GRAPH_MODEL)
        spec = CacheSpec(page_size=64, kv_cache_dtype=kv_cache_dtype)
        pool = KVPool(cfg, spec, 64, BF16, DEV)
        config = {"kv_cache_dtype": kv_cache_dtype, "page_size": 64, "dtype": "bfloat16"}
        if kernels == "torch":
            choices = {op: "torch" for op in REFERENCE_OPS}
        else:
            defaults = backend.default_kernels(kv_cache_dtype, 64, dtype="bfloat16")
            choices = {op: "torch" for op, name in defaults.items() if (op, name) in failed_kernels()}
            replaced = f"; torch for failed {sorted(choices)}" if choices else ""
        ops = backend.ops(choices, config)
        lengths = [40, 130, 7]
        pages = [pool.allocate(4) for _ in lengths]
        with torch.inference_mode():
            for n, p in zip(lengths, pages):
                ids = torch.randint(0, cfg.vocab_size, (n,), device=DEV)
                model(ids, build_metadata([SeqChunk(0, n, p)], 64, DEV), pool.layers, ops)
        forward = lambda i, m: model(i, m, pool.layers, ops)  # noqa: E731
        runner = DecodeGraphRunner(forward, max_batch_size=8, max_seq_len=256, page_size=64, device=DEV)
        t0 = time.perf_counter()
        runner.capture()
        capture_s = time.perf_counter() - t0
        worst = 0.0
        for step in range(3):
            meta = build_metadata([SeqChunk(n + step, 1, p) for n, p in zip(lengths, pages)], 64, DEV)
            ids = torch.randint(0, cfg.vocab_size, (len(lengths),), device=DEV)
            with torch.inference_mode():
                eager = forward(ids, meta).clone()  # writes the same KV slots the replay rewrites
                graph = runner(ids, meta).clone()
            worst = max(worst, rel_err(graph, eager)[0])
        assert runner.stats["replayed"] == 3, runner.stats
        with torch.inference_mode():
            ms_graph = timed(lambda: runner(ids, meta), 20)
            ms_eager = timed(lambda: forward(ids, meta), 20)
        status = "ok" if worst < 1e-2 else "MISMATCH"
        note = f"capture {capture_s:.1f}s for sizes {runner.sizes}; eager {ms_eager:.2f} ms/step{replaced}"
        record("cuda_graph", label, f"{kernels} bs=3->4", status, f"rel {worst:.2e}", ms_graph, note)
    except Exception as exc:
        # The reference fused_moe calls .tolist(): capturing it is expected to fail (reported, not counted).
        blocked = moe and (kernels == "torch" or "fused_moe" in replaced)
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}{replaced}"
        record("cuda_graph", label, kernels, "blocked" if blocked else "FAIL", note=why)
        traceback.print_exc()


# ----- main -----


def print_table() -> None:
    cols = ("op", "case", "kernel", "status", "metric", "ms", "note")
    fmt = {"ms": lambda v: "" if v is None else f"{v:.3f}"}
    cells = [[fmt.get(c, str)(r[c]) for c in cols] for r in ROWS]
    widths = [
        min(max(len(c), *(len(x[i]) for x in cells)), 60 if c != "note" else 110) for i, c in enumerate(cols)
    ]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(x[:w].ljust(w) for x, w in zip(row, widths)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", help="comma-separated operations to check (default: all)")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph check")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per kernel")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    import dsv_cuda
    from dsv_cuda.backend import CudaBackend

    probe = dsv_cuda.probe()
    print(f"probe: available={probe.available} ({probe.reason}); torch {torch.__version__}")
    if not probe.available:
        return 1
    backend = CudaBackend("cuda")
    print("defaults bf16 KV:", backend.default_kernels("auto", page_size=64))
    print("defaults fp8 KV: ", backend.default_kernels("fp8_e4m3", page_size=64))
    only = set(args.ops.split(",")) if args.ops else None
    check_kernels(backend, only, args.iters)
    if not args.no_graphs and (only is None or "cuda_graph" in only):
        for kv in ("auto", "fp8_e4m3"):
            for kernels in ("torch", "defaults"):
                check_graphs(backend, kv, kernels)
        check_graphs(backend, "auto", "defaults", moe=True)
        check_graphs(backend, "auto", "torch", moe=True)
    print_table()
    out = args.json or (os.path.join(os.environ["OUT"], "h200_check.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(ROWS, indent=1))
    return 1 if any(r["status"] in ("FAIL", "MISMATCH", "ERROR") for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
