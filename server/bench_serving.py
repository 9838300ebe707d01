"""``dsv bench serving``: latency and throughput of a running OpenAI-compatible server.

In the spirit of ``python -m sglang.bench_serving``: a dataset of prompts (``random`` token ids, or a
ShareGPT-format JSON file) is sent to ``/v1/completions`` with streaming on, either all at once
(``--request-rate inf``) or with Poisson arrivals, optionally capped by ``--max-concurrency``. Each stream is
timed chunk by chunk, which yields TTFT (time to first token), ITL (inter-token latency, between successive
chunks), TPOT (time per output token after the first) and end-to-end latency, plus request and token
throughput. ``--output-file`` writes the results as JSON and ``--plot`` draws them as a PNG (needs
matplotlib: ``pip install 'dsv[plot]'``).

The lead wires this in ``dsv bench``: ``add_serving_arguments(sub.add_parser("serving"))`` and
``run_serving(args)``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BASE_URL = "http://127.0.0.1:30000"
# Low ids are bytes/BOS/EOS and the top of the vocabulary holds special tokens; random prompts avoid both.
_RANDOM_ID_LOW = 100
_RANDOM_ID_TOP_MARGIN = 1000


# --------------------------------------------------------------------------------------------- datasets


@dataclass
class BenchRequest:
    """One prompt to send: text or token ids, with the lengths the benchmark expects."""

    prompt: str | list[int]
    prompt_len: int
    output_len: int


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    seed: int,
    tokenizer: Any = None,
) -> list[BenchRequest]:
    """``num_prompts`` prompts of random token ids, lengths drawn uniformly from ``[ratio*len, len]``.

    With a ``tokenizer`` the ids are decoded to text (the server re-tokenizes, so the input length is only
    approximate); without one the ids are sent as a list, which hits the input length exactly.
    """
    rng = random.Random(seed)
    high = max(_RANDOM_ID_LOW + 1, vocab_size - _RANDOM_ID_TOP_MARGIN)
    out = []
    for _ in range(num_prompts):
        n_in = rng.randint(max(1, int(input_len * range_ratio)), max(1, input_len))
        n_out = rng.randint(max(1, int(output_len * range_ratio)), max(1, output_len))
        ids = [rng.randrange(_RANDOM_ID_LOW, high) for _ in range(n_in)]
        prompt: str | list[int] = tokenizer.decode(ids) if tokenizer is not None else ids
        out.append(BenchRequest(prompt, n_in, n_out))
    return out


def sharegpt_requests(
    path: str | Path,
    num_prompts: int,
    tokenizer: Any,
    seed: int,
    fixed_output_len: int | None = None,
    context_len: int | None = None,
) -> list[BenchRequest]:
    """Prompts from a ShareGPT-format JSON file: a list of ``{"conversations": [{"from", "value"}, ...]}``.

    The first turn is the prompt and the second turn's token count the target output length (unless
    ``fixed_output_len``). Like sglang, very short pairs and over-long ones are skipped, and the
    conversations are shuffled with a seeded RNG before ``num_prompts`` are taken.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    convs = [d.get("conversations") or d.get("conversation") or [] for d in data]
    pairs = [(c[0]["value"], c[1]["value"]) for c in convs if len(c) >= 2]
    random.Random(seed).shuffle(pairs)
    out: list[BenchRequest] = []
    for prompt, reply in pairs:
        if len(out) >= num_prompts:
            break
        n_in = len(tokenizer.encode(prompt))
        n_out = fixed_output_len if fixed_output_len is not None else len(tokenizer.encode(reply))
        if n_in < 2 or n_out < 2:
            continue  # too short to time meaningfully
        if context_len is not None:
            if n_in + n_out > context_len:
                continue
        elif fixed_output_len is None and (n_in > 1024 or n_in + n_out > 2048):
            continue  # sglang's default budget for ShareGPT pairs
        out.append(BenchRequest(prompt, n_in, n_out))
    if len(out) < num_prompts:
        print(f"warning: only {len(out)} usable conversations in {path}", file=sys.stderr)
    return out


# --------------------------------------------------------------------------------------------- requests


@dataclass
class RequestResult:
    """What one streamed request measured; times are seconds."""

    prompt_len: int
    output_len: int = 0
    success: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    start: float = 0.0  # relative to the start of the benchmark
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def send_one(
    client: Any, model: str, req: BenchRequest, ignore_eos: bool, temperature: float, t0: float
) -> RequestResult:
    """Stream one completion and time each chunk that carries text."""
    res = RequestResult(prompt_len=req.prompt_len)
    start = time.perf_counter()
    res.start = start - t0
    last = start
    chunks = 0
    usage_tokens: int | None = None
    usage_prompt: int | None = None
    try:
        stream = await client.completions.create(
            model=model,
            prompt=req.prompt,
            max_tokens=req.output_len,
            temperature=temperature,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": ignore_eos},
        )
        async for chunk in stream:
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
                usage_prompt = chunk.usage.prompt_tokens
            if not chunk.choices or not chunk.choices[0].text:
                continue
            now = time.perf_counter()
            if chunks == 0:
                res.ttft = now - start
            else:
                res.itl.append(now - last)
            last = now
            chunks += 1
        res.latency = time.perf_counter() - start
        # The server's count is exact; a chunk may carry several tokens, so chunks are only the fallback.
        res.output_len = usage_tokens if usage_tokens is not None else chunks
        # Text prompts are re-tokenized by the server, so its prompt count beats the dataset's estimate.
        if usage_prompt:
            res.prompt_len = usage_prompt
        res.success = chunks > 0
        if not res.success:
            res.error = "empty stream"
    except Exception as exc:  # one failed request must not end the benchmark
        res.latency = time.perf_counter() - start
        res.error = f"{type(exc).__name__}: {exc}"
    return res


def arrival_delays(n: int, request_rate: float, seed: int) -> list[float]:
    """Gaps before each request: zero for ``inf``, else exponential (a Poisson process) from a seeded RNG."""
    if math.isinf(request_rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(request_rate) for _ in range(n)]


async def run_requests(
    client: Any,
    model: str,
    requests: Sequence[BenchRequest],
    request_rate: float,
    max_concurrency: int | None,
    ignore_eos: bool,
    temperature: float,
    seed: int,
    progress: bool = True,
) -> tuple[list[RequestResult], float]:
    """Send every request on its arrival schedule; returns the results (in order) and the wall time."""
    from tqdm.auto import tqdm

    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), desc="requests", disable=not progress)

    async def limited(req: BenchRequest, t0: float) -> RequestResult:
        if sem is None:
            res = await send_one(client, model, req, ignore_eos, temperature, t0)
        else:
            async with sem:
                res = await send_one(client, model, req, ignore_eos, temperature, t0)
        bar.update(1)
        return res

    t0 = time.perf_counter()
    tasks = []
    for req, delay in zip(requests, arrival_delays(len(requests), request_rate, seed)):
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(limited(req, t0)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    bar.close()
    return list(results), duration


# --------------------------------------------------------------------------------------------- metrics


def _stats(values: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    """Mean, median, std and p99 (scaled, milliseconds by default); zeros for an empty list."""
    import numpy as np

    if not values:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, "p99": 0.0}
    arr = np.asarray(values, dtype=np.float64) * scale
    return {
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "std": float(arr.std()),
        "p99": float(np.percentile(arr, 99)),
    }


def compute_metrics(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    """Aggregate the per-request measurements; latencies in ms, throughputs per second of wall time."""
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    # TPOT excludes the first token, so one-token outputs have none.
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    duration = max(duration, 1e-9)
    metrics: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "input_throughput": total_in / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        # Average number of requests in flight: total busy time over wall time.
        "concurrency": sum(r.latency for r in ok) / duration,
    }
    for name, values in (
        ("ttft_ms", [r.ttft for r in ok]),
        ("tpot_ms", tpots),
        ("itl_ms", [x for r in ok for x in r.itl]),
        ("e2e_latency_ms", [r.latency for r in ok]),
    ):
        for stat, value in _stats(values).items():
            metrics[f"{stat}_{name}"] = value
    return metrics


def format_report(metrics: dict[str, Any], config: dict[str, Any]) -> str:
    """A fixed-width table like sglang's ``Serving Benchmark Result``."""
    rows: list[tuple[str, Any]] = [
        ("Backend", "openai-compat"),
        ("Request rate (req/s)", config["request_rate"]),
        ("Max concurrency", config["max_concurrency"] or "none"),
        ("Successful requests", metrics["completed"]),
        ("Failed requests", metrics["failed"]),
        ("Benchmark duration (s)", f"{metrics['duration_s']:.2f}"),
        ("Total input tokens", metrics["total_input_tokens"]),
        ("Total generated tokens", metrics["total_output_tokens"]),
        ("Request throughput (req/s)", f"{metrics['request_throughput']:.2f}"),
        ("Input token throughput (tok/s)", f"{metrics['input_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{metrics['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{metrics['total_token_throughput']:.2f}"),
        ("Concurrency", f"{metrics['concurrency']:.2f}"),
    ]
    for name, title in (
        ("e2e_latency_ms", "E2E Latency"),
        ("ttft_ms", "Time to First Token"),
        ("tpot_ms", "Time per Output Token (excl. 1st token)"),
        ("itl_ms", "Inter-Token Latency"),
    ):
        rows.append((f"-- {title} --", ""))
        for stat in ("mean", "median", "p99"):
            rows.append(
                (f"{stat.capitalize()} {name.replace('_ms', '')} (ms)", f"{metrics[f'{stat}_{name}']:.2f}")
            )
    width = 50
    lines = ["=" * width, "Serving Benchmark Result".center(width, "="), "=" * width]
    lines += [f"{k:<40}{v!s:>10}" if v != "" else k.center(width, "-") for k, v in rows]
    lines.append("=" * width)
    return "\n".join(lines)


def save_plot(results: Sequence[RequestResult], path: str | Path) -> bool:
    """Draw TTFT / ITL histograms and latency over arrival time into a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a benchmark box
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "--plot needs matplotlib, which is not installed: pip install 'dsv[plot]' (or matplotlib>=3.7)",
            file=sys.stderr,
        )
        return False
    ok = [r for r in results if r.success]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].hist([r.ttft * 1000 for r in ok], bins=30)
    axes[0].set(title="TTFT", xlabel="ms", ylabel="requests")
    axes[1].hist([x * 1000 for r in ok for x in r.itl], bins=50)
    axes[1].set(title="Inter-token latency", xlabel="ms", ylabel="tokens")
    axes[2].scatter([r.start for r in ok], [r.latency for r in ok], s=8)
    axes[2].set(title="E2E latency by arrival", xlabel="arrival (s)", ylabel="latency (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------- CLI


def add_serving_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``dsv bench serving`` (names follow sglang.bench_serving)."""
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help="server URL (with or without /v1)")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--dataset-name", choices=["random", "sharegpt"], default="random")
    p.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file (--dataset-name sharegpt)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument(
        "--random-range-ratio",
        type=float,
        default=1.0,
        help="lengths are drawn from [ratio*len, len]; 1.0 = fixed lengths",
    )
    p.add_argument(
        "--random-prompt-format",
        choices=["ids", "text"],
        default="ids",
        help="ids: send token ids (exact lengths); text: decode them with the tokenizer first",
    )
    p.add_argument(
        "--random-vocab-size",
        type=int,
        default=None,
        help="draw random ids below this (default: the tokenizer's vocabulary size)",
    )
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="override each reply's length")
    p.add_argument("--sharegpt-context-len", type=int, default=None, help="skip longer prompt+reply pairs")
    p.add_argument("--tokenizer", default=None, help="model folder with tokenizer.json (default: packaged)")
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests per second (Poisson arrivals); inf = send all at once",
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--disable-ignore-eos", action="store_true", help="let requests stop at EOS (default: ignore it)"
    )
    p.add_argument("--warmup-requests", type=int, default=1, help="untimed requests sent first")
    p.add_argument("--seed", type=int, default=1, help="seeds the dataset and the arrival times")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--output-file", default=None, help="write the results as JSON here")
    p.add_argument("--output-details", action="store_true", help="include per-request timings in the JSON")
    p.add_argument("--plot", default=None, help="write a PNG of TTFT/ITL/latency here (needs matplotlib)")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def openai_base_url(base_url: str) -> str:
    """The OpenAI client wants the ``/v1`` root; accept the bare server URL too."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


async def resolve_model(client: Any, model: str | None) -> str:
    """``model`` if given, else the first model the server lists (``default`` if it lists none)."""
    if model:
        return model
    try:
        models = await client.models.list()
        if models.data:
            return models.data[0].id
    except Exception:  # an older or minimal server may not implement /v1/models
        pass
    return "default"


def build_requests(args: argparse.Namespace) -> list[BenchRequest]:
    """The dataset the flags describe."""
    from dsv.tokenizer import Tokenizer

    if args.dataset_name == "sharegpt":
        if not args.dataset_path:
            raise SystemExit("--dataset-name sharegpt needs --dataset-path")
        tok = Tokenizer.from_model_dir(args.tokenizer)
        return sharegpt_requests(
            args.dataset_path,
            args.num_prompts,
            tok,
            args.seed,
            args.sharegpt_output_len,
            args.sharegpt_context_len,
        )
    # The tokenizer is only loaded when something needs it.
    tok = None
    if args.random_prompt_format == "text" or args.random_vocab_size is None:
        tok = Tokenizer.from_model_dir(args.tokenizer)
    vocab = args.random_vocab_size or tok.vocab_size
    return random_requests(
        args.num_prompts,
        args.random_input_len,
        args.random_output_len,
        args.random_range_ratio,
        vocab,
        args.seed,
        tok if args.random_prompt_format == "text" else None,
    )


async def _bench(args: argparse.Namespace, requests: list[BenchRequest]) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(
        base_url=openai_base_url(args.base_url), api_key=args.api_key, timeout=args.timeout, max_retries=0
    )
    try:
        model = await resolve_model(client, args.model)
        ignore_eos = not args.disable_ignore_eos
        for req in requests[: args.warmup_requests]:
            warm = BenchRequest(req.prompt, req.prompt_len, min(req.output_len, 16))
            res = await send_one(client, model, warm, ignore_eos, args.temperature, time.perf_counter())
            if not res.success:
                raise SystemExit(f"warm-up request failed: {res.error}")
        results, duration = await run_requests(
            client,
            model,
            requests,
            args.request_rate,
            args.max_concurrency,
            ignore_eos,
            args.temperature,
            args.seed,
            progress=not args.disable_tqdm,
        )
    finally:
        await client.close()
    config = {
        "base_url": args.base_url,
        "model": model,
        "dataset_name": args.dataset_name,
        "dataset_path": args.dataset_path,
        "num_prompts": len(requests),
        "request_rate": args.request_rate if not math.isinf(args.request_rate) else "inf",
        "max_concurrency": args.max_concurrency,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "ignore_eos": ignore_eos,
        "seed": args.seed,
    }
    return {"config": config, "metrics": compute_metrics(results, duration), "_results": results}


def run_serving(args: argparse.Namespace) -> int:
    """Run the benchmark; prints the table, writes ``--output-file`` / ``--plot``. Exit 1 if all failed."""
    requests = build_requests(args)
    if not requests:
        print("no requests to send", file=sys.stderr)
        return 1
    out = asyncio.run(_bench(args, requests))
    results: list[RequestResult] = out.pop("_results")
    print(format_report(out["metrics"], out["config"]))
    errors = sorted({r.error for r in results if r.error})
    if errors:
        print(f"{len(errors)} distinct error(s), e.g.: {errors[0]}", file=sys.stderr)
    if args.output_details:
        out["requests"] = [asdict(r) for r in results]
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        save_plot(results, args.plot)
    return 0 if out["metrics"]["completed"] > 0 else 1
