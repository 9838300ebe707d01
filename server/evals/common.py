"""What the accuracy evals share: the client, bounded parallel chat requests, and result output."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_BASE_URL = "http://127.0.0.1:30000"

Message = dict[str, str]


def sample_path(name: str) -> Path:
    """Path of a sample data file shipped in ``dsv/server/evals/data``."""
    return Path(str(resources.files("dsv.server.evals") / "data" / name))


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    """Flags every eval takes: where the server is and how to write results."""
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help="server URL (with or without /v1)")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--output-file", default=None, help="append one JSON line with the results here")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


@dataclass
class ChatResult:
    """One chat completion: the answer text (empty on error) and the tokens it took."""

    text: str
    completion_tokens: int
    error: str = ""


async def _chat_all(
    args: argparse.Namespace,
    conversations: Sequence[list[Message]],
    max_tokens: int,
    parallel: int,
    extra_body: dict[str, Any] | None,
    stop: list[str] | None,
    desc: str,
) -> list[ChatResult]:
    from openai import AsyncOpenAI
    from tqdm.auto import tqdm

    from dsv.server.bench_serving import openai_base_url, resolve_model

    client = AsyncOpenAI(
        base_url=openai_base_url(args.base_url), api_key=args.api_key, timeout=args.timeout, max_retries=0
    )
    sem = asyncio.Semaphore(max(1, parallel))
    bar = tqdm(total=len(conversations), desc=desc, disable=args.disable_tqdm)

    async def one(messages: list[Message], model: str) -> ChatResult:
        async with sem:
            try:
                resp = await client.chat.completions.create(
                    model=model,
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=max_tokens,
                    temperature=args.temperature,
                    stop=stop,
                    extra_body=extra_body,
                )
                text = resp.choices[0].message.content or ""
                tokens = resp.usage.completion_tokens if resp.usage else 0
                result = ChatResult(text, tokens)
            except Exception as exc:  # a failed question counts as invalid, not as a crash
                result = ChatResult("", 0, f"{type(exc).__name__}: {exc}")
        bar.update(1)
        return result

    try:
        model = await resolve_model(client, args.model)
        return list(await asyncio.gather(*(one(m, model) for m in conversations)))
    finally:
        bar.close()
        await client.close()


def chat_all(
    args: argparse.Namespace,
    conversations: Sequence[list[Message]],
    max_tokens: int,
    parallel: int,
    extra_body: dict[str, Any] | None = None,
    stop: list[str] | None = None,
    desc: str = "questions",
) -> tuple[list[ChatResult], float]:
    """Send every conversation, at most ``parallel`` at a time; returns results in order and the wall time."""
    start = time.perf_counter()
    results = asyncio.run(_chat_all(args, conversations, max_tokens, parallel, extra_body, stop, desc))
    return results, time.perf_counter() - start


def run_stats(results: Sequence[ChatResult], latency: float) -> dict[str, Any]:
    """The summary fields every eval reports about the run itself: latency, tokens, throughput, errors."""
    out_tokens = sum(r.completion_tokens for r in results)
    return {
        "latency_s": latency,
        "output_tokens": out_tokens,
        "output_throughput": out_tokens / max(latency, 1e-9),
        "errors": sum(bool(r.error) for r in results),
    }


def print_run_stats(summary: dict[str, Any], failed_as: str) -> None:
    """Print the invalid share and the run statistics; failed requests are scored as ``failed_as``."""
    print(f"Invalid: {summary['invalid']:.3f}")
    print(f"Latency: {summary['latency_s']:.3f} s")
    print(f"Output throughput: {summary['output_throughput']:.3f} token/s")
    if summary["errors"]:
        print(f"Failed requests: {summary['errors']} (counted as {failed_as})")


def write_result(path: str | None, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line (several runs can share a file, as in sglang's result files)."""
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
