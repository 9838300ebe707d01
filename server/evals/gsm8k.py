"""``dsv eval gsm8k``: few-shot grade-school math, graded on the last number of each answer.

In the spirit of SGLang's ``benchmark/gsm8k/bench_sglang.py``. The data file is JSONL in the public GSM8K
format: ``{"question": ..., "answer": "... #### <number>"}``. The first ``--num-shots`` lines are the worked
examples (sent as earlier chat turns) and the next ``--num-questions`` are graded, so no question is its own
example. Reports accuracy, the invalid rate (answers with no number), wall latency and output throughput.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from dsv.server.evals.common import (
    Message,
    add_client_arguments,
    chat_all,
    print_run_stats,
    run_stats,
    sample_path,
    write_result,
)

SAMPLE_FILE = "gsm8k_sample.jsonl"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``dsv eval gsm8k``."""
    add_client_arguments(p)
    p.add_argument(
        "--data-path", default=None, help=f"GSM8K-format JSONL (default: the bundled {SAMPLE_FILE})"
    )
    p.add_argument("--num-shots", type=int, default=5, help="worked examples before each question")
    p.add_argument(
        "--num-questions", type=int, default=200, help="questions graded (at most what the file has)"
    )
    p.add_argument("--parallel", type=int, default=64, help="requests in flight at once")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens generated per answer")


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def extract_number(text: str) -> float | None:
    """The last number in ``text`` (thousands separators removed), or None when there is none."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def reference_answer(answer: str) -> float:
    """The number after ``####`` in a GSM8K answer."""
    value = extract_number(answer.split("####")[-1])
    if value is None:
        raise ValueError(f"GSM8K answer without a '#### <number>' line: {answer!r}")
    return value


def build_messages(shots: list[dict[str, Any]], question: str) -> list[Message]:
    """Worked examples as earlier user/assistant turns, then the question in the same format."""
    messages: list[Message] = []
    for shot in shots:
        messages.append({"role": "user", "content": f"Question: {shot['question']}\nAnswer:"})
        messages.append({"role": "assistant", "content": shot["answer"]})
    messages.append({"role": "user", "content": f"Question: {question}\nAnswer:"})
    return messages


def run(args: argparse.Namespace) -> int:
    """Run the eval, print a summary, append it to ``--output-file``; exit 1 when nothing was graded."""
    path = args.data_path or sample_path(SAMPLE_FILE)
    lines = load_jsonl(path)
    shots = lines[: args.num_shots]
    items = lines[args.num_shots : args.num_shots + args.num_questions]
    if not items:
        print(f"no questions left in {path} after {len(shots)} shots")
        return 1
    labels = [reference_answer(item["answer"]) for item in items]
    conversations = [build_messages(shots, item["question"]) for item in items]
    # "Question:" stops a model that goes on to invent the next example, as in the sglang script.
    results, latency = chat_all(
        args, conversations, args.max_tokens, args.parallel, stop=["Question:"], desc="gsm8k"
    )
    preds = [extract_number(r.text) for r in results]
    correct = sum(p is not None and abs(p - y) < 1e-6 for p, y in zip(preds, labels))
    invalid = sum(p is None for p in preds)
    summary = {
        "task": "gsm8k",
        "num_questions": len(items),
        "num_shots": len(shots),
        "accuracy": correct / len(items),
        "invalid": invalid / len(items),
        **run_stats(results, latency),
    }
    print(f"Accuracy: {summary['accuracy']:.3f}")
    print_run_stats(summary, "invalid")
    write_result(args.output_file, summary)
    return 0
