"""``dsv generate``: one prompt through the single-request loop (no server, no batching)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="local folder or Hugging Face repo id (default: embedded tiny model)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt (encoded as-is, BOS prepended)")
    src.add_argument("--input-ids", help="comma-separated token ids, e.g. 0,5,7")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cpu", help="backend name (cpu, cuda, ...)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "bf16", "fp8_e4m3"], default="auto")
    p.add_argument("--indexer-quant", choices=["fp8", "none"], default="fp8")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    from dsv.engine.config import add_graph_arguments

    add_graph_arguments(p)


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise SystemExit(f"--input-ids must be comma-separated integers: {exc}") from exc
    if not ids:
        raise SystemExit("--input-ids is empty")
    return ids


def run(args: argparse.Namespace) -> int:
    from dsv.backend.registry import select_backend
    from dsv.engine.graphs import GraphSettings
    from dsv.engine.kv_pool import CacheSpec
    from dsv.engine.sampling import SamplingParams
    from dsv.engine.single import SingleRequestGenerator
    from dsv.model.loader import load_model
    from dsv.model.resolve import resolve_model_path
    from dsv.tokenizer import Tokenizer

    backend = select_backend(args.device)
    device = backend.capabilities().torch_device
    path = resolve_model_path(args.model)
    tokenizer = Tokenizer.from_model_dir(path)
    model = load_model(path, DTYPES[args.dtype], device)
    ids = parse_ids(args.input_ids) if args.input_ids else tokenizer.encode(args.prompt, add_bos=True)
    vocab = model.cfg.vocab_size
    if any(not 0 <= i < vocab for i in ids):
        raise SystemExit(f"--input-ids must lie in [0, {vocab})")
    spec = CacheSpec(args.page_size, args.kv_cache_dtype, args.indexer_quant)
    cache_config = {
        "kv_cache_dtype": args.kv_cache_dtype,
        "page_size": args.page_size,
        "indexer_quant": args.indexer_quant,
        "dtype": args.dtype,
    }
    ops = backend.ops(None, cache_config)
    graphs = GraphSettings.from_flags(args.disable_cuda_graph, args.cuda_graph_max_bs, args.cuda_graph_bs)
    gen = SingleRequestGenerator(model, ops, spec, len(ids) + args.max_new_tokens, device, backend, graphs)
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_new_tokens,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    start = time.perf_counter()
    out = gen.generate(ids, params)
    elapsed = time.perf_counter() - start
    text = tokenizer.decode(out)
    if args.json:
        print(
            json.dumps(
                {
                    "prompt_token_ids": ids,
                    "output_token_ids": out,
                    "text": text,
                    "elapsed_s": round(elapsed, 4),
                    "model": str(path),
                }
            )
        )
    else:
        sys.stdout.write(text + "\n")
        print(f"[{len(out)} tokens in {elapsed:.2f}s]", file=sys.stderr)
    return 0
