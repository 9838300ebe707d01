"""A full-width DeepSeek-V3.2 slice on one GPU: the decode step per layer, DSA vs dense attention.

The command line of benchmarks/slice_v32.py (whose docstring describes the figures): flags, run, tables, JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from .config import GB, TINY_CONFIG, V32_CONFIG, slice_config
from .extrapolate import Deployment, extrapolate, full_model_bytes
from .optables import ops_for, parse_kernel_choices
from .report import print_extrapolation, print_tables
from .runner import run
from .settings import Settings
from .timing import Timer, free_memory
from .weights import build_model


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
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile N eager runs of the attention block and of the step: kernels by time (JSON + log)",
    )
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
        profile_iters=args.profile,
    )
    for kv in kv_dtypes:  # refuse a bad kernel choice before building tens of GB of weights
        ops_for(s, kv)
    t0 = time.monotonic()
    model = build_model(cfg, device, args.seed)
    free_memory(device)
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
