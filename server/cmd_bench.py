"""``dsv bench offline``: throughput of the engine on random prompts, without a server.

Like ``vllm bench throughput --dataset-name random``: ``--num-prompts`` prompts of ``--input-len`` random token
ids, each generating exactly ``--output-len`` tokens (EOS ignored), all submitted at once. Prints requests/s and
input/output tokens/s (``--json``: one JSON object as the last line). ``dsv bench serving`` measures a running
server instead (:mod:`dsv.server.bench_serving`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True)
    off = sub.add_parser("offline", help="engine throughput on random prompts (no server)")
    off.add_argument("--model", default=None, help="folder or cached Hub id (default: embedded tiny model)")
    off.add_argument("--device", default="cpu", help="backend name (cpu, cuda, ...)")
    off.add_argument("--dtype", default="auto", help="auto, bfloat16 or float32")
    off.add_argument("--num-prompts", type=int, default=32)
    off.add_argument("--input-len", type=int, default=128)
    off.add_argument("--output-len", type=int, default=64)
    off.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    off.add_argument("--dataset-seed", type=int, default=0, help="seed of the random prompts")
    off.add_argument("--warmup", type=int, default=1, help="warm-up rounds (same shapes, not timed)")
    off.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    off.add_argument("--save-outputs", default=None, help="write every prompt's output token ids (JSON) here")
    from dsv.engine.config import add_engine_arguments
    from dsv.server.bench_serving import add_serving_arguments

    add_engine_arguments(off)
    add_serving_arguments(
        sub.add_parser("serving", help="latency/throughput of a running server (sglang.bench_serving-style)")
    )


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``length`` ids drawn uniformly from ordinary (non-special) tokens."""
    import torch

    low, high = 100, max(101, vocab - 1000)  # low ids are bytes/BOS/EOS, the top of the vocab is special
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, length), generator=g).tolist()


def run(args: argparse.Namespace) -> int:
    if args.bench == "serving":
        from dsv.server.bench_serving import run_serving

        return run_serving(args)
    from dsv.engine.config import engine_config_from_args
    from dsv.engine.sampling import SamplingParams
    from dsv.llm import LLM

    config = engine_config_from_args(args)
    llm = LLM(args.model, args.device, args.dtype, **vars(config))
    vocab = min(llm.engine.model.cfg.vocab_size, llm.tokenizer.vocab_size if llm.tokenizer else 1 << 30)
    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True, seed=args.dataset_seed
    )
    for i in range(args.warmup):  # compiles the kernels for these shapes (oneDNN JIT on the CPU)
        warm = random_prompts(args.num_prompts, args.input_len, vocab, args.dataset_seed + 1000 + i)
        llm.generate(prompt_token_ids=warm, sampling_params=SamplingParams(temperature=0, max_tokens=2))
    llm.reset_prefix_cache()
    prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.dataset_seed)
    runner = llm.engine.runner
    steps_before = dict(runner.steps)
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    elapsed = time.perf_counter() - start
    if args.save_outputs:
        with open(args.save_outputs, "w") as f:
            json.dump([o.outputs[0].token_ids for o in outs], f)
    n_in = sum(len(p) for p in prompts)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(outs) / elapsed, 3),
        "input_tokens_per_s": round(n_in / elapsed, 1),
        "output_tokens_per_s": round(n_out / elapsed, 1),
        "total_tokens_per_s": round((n_in + n_out) / elapsed, 1),
        "device": args.device,
        "dtype": str(llm.engine.model.dtype).removeprefix("torch."),
        "kv_cache_dtype": config.kv_cache_dtype,
        "page_size": config.page_size,
        # Forwards of the timed run: pure decode steps through the decode runner (graphs) vs eager ones.
        "steps": {k: v - steps_before[k] for k, v in runner.steps.items()},
        "decode_graphs": llm.engine.decode_runner.describe() if llm.engine.decode_runner else None,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"Throughput: {result['requests_per_s']:.2f} requests/s, "
            f"{result['input_tokens_per_s']:.1f} input tokens/s, "
            f"{result['output_tokens_per_s']:.1f} output tokens/s "
            f"({args.num_prompts} prompts x {args.input_len} in / {args.output_len} out in {elapsed:.2f} s)"
        )
    sys.stdout.flush()
    return 0
