"""``dsv eval gpqa``: four-way multiple-choice science questions, graded on the letter chosen.

In the spirit of ``python -m sglang.test.run_eval --eval-name gpqa``. The data file is a CSV in the public
GPQA format, with the columns ``Question``, ``Correct Answer`` and ``Incorrect Answer 1..3``. The four choices
are shuffled per example and per repeat by a seeded RNG, so the right letter is spread over A-D; the
``--repeat`` runs are averaged. ``--thinking-mode`` asks the chat template for DeepSeek's thinking mode.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from dsv.server.evals.common import (
    Message,
    add_client_arguments,
    chat_all,
    print_run_stats,
    run_stats,
    sample_path,
    write_result,
)

SAMPLE_FILE = "gpqa_sample.csv"
LETTERS = "ABCD"
# "Answer: x" in any case, or "the answer is X" with a capital (so "the answer is a bit..." is no answer).
_ANSWER_LINE = re.compile(
    r"answer\s*(?:[:：]\s*\**\s*\(?\$?([A-D])|is\s*\**\s*\(?\$?((?-i:[A-D]))\)?\**[.)]?(?!\w))",
    re.IGNORECASE,
)
_BARE_LETTER = re.compile(r"^\s*\**\(?([A-D])\)?[.)]?\**\s*$", re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)

PROMPT = (
    "Answer the multiple-choice question below. Reason it through, then end your reply with a line of "
    "the form 'Answer: X', where X is one of A, B, C or D.\n\n{question}\n\n"
    "A) {A}\nB) {B}\nC) {C}\nD) {D}"
)


@dataclass
class Example:
    """One question with its choices in the order shown and the letter of the right one."""

    prompt: str
    correct: str


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``dsv eval gpqa``."""
    add_client_arguments(p)
    p.add_argument("--data-path", default=None, help=f"GPQA-format CSV (default: the bundled {SAMPLE_FILE})")
    p.add_argument("--num-examples", type=int, default=None, help="sample this many questions (default: all)")
    p.add_argument("--repeat", type=int, default=1, help="runs over the questions, averaged")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens generated per answer")
    p.add_argument("--parallel", "--num-threads", type=int, default=64, help="requests in flight at once")
    p.add_argument("--seed", type=int, default=0, help="seeds the question sample and the choice order")
    p.add_argument(
        "--thinking-mode",
        action="store_true",
        help='send chat_template_kwargs={"thinking": true} (DeepSeek thinking mode)',
    )


def load_rows(path: str | Path) -> list[dict[str, str]]:
    """The CSV rows, checked for the GPQA columns."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = ["Question", "Correct Answer"] + [f"Incorrect Answer {i}" for i in (1, 2, 3)]
    missing = [c for c in need if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{path} lacks the GPQA column(s) {missing}")
    return rows


def make_examples(rows: list[dict[str, str]], repeat: int, rng: random.Random) -> list[list[Example]]:
    """``repeat`` lists of examples, each question with its own shuffle of the four choices."""
    runs = []
    for _ in range(repeat):
        run = []
        for row in rows:
            choices = [row["Correct Answer"]] + [row[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
            order = rng.sample(range(4), 4)  # order[k] = which choice is shown as letter k
            shown = [choices[k].strip() for k in order]
            prompt = PROMPT.format(question=row["Question"].strip(), **dict(zip(LETTERS, shown)))
            run.append(Example(prompt, LETTERS[order.index(0)]))
        runs.append(run)
    return runs


def extract_letter(text: str) -> str | None:
    """The letter the reply chose: its last 'Answer: X', else a reply that is just a letter."""
    text = _THINK_BLOCK.sub("", text)  # a server that inlines its reasoning: grade only the final part
    found = list(_ANSWER_LINE.finditer(text))
    if found:
        return (found[-1].group(1) or found[-1].group(2)).upper()
    bare = _BARE_LETTER.match(text)
    return bare.group(1).upper() if bare else None


def run(args: argparse.Namespace) -> int:
    """Run the eval, print a summary, append it to ``--output-file``; exit 1 when there are no questions."""
    path = args.data_path or sample_path(SAMPLE_FILE)
    rows = load_rows(path)
    rng = random.Random(args.seed)
    if args.num_examples is not None and args.num_examples < len(rows):
        rows = rng.sample(rows, args.num_examples)
    if not rows or args.repeat < 1:
        print(f"no questions to ask from {path}")
        return 1
    runs = make_examples(rows, args.repeat, rng)
    flat = [ex for run_ in runs for ex in run_]
    conversations: list[list[Message]] = [[{"role": "user", "content": ex.prompt}] for ex in flat]
    extra = {"chat_template_kwargs": {"thinking": True}} if args.thinking_mode else None
    results, latency = chat_all(
        args, conversations, args.max_tokens, args.parallel, extra_body=extra, desc="gpqa"
    )
    picks = [extract_letter(r.text) for r in results]
    hits = [p == ex.correct for p, ex in zip(picks, flat)]
    n = len(rows)
    scores = [sum(hits[i * n : (i + 1) * n]) / n for i in range(args.repeat)]
    summary = {
        "task": "gpqa",
        "num_examples": n,
        "repeat": args.repeat,
        "thinking_mode": args.thinking_mode,
        "score": statistics.fmean(scores),
        "scores": scores,
        "std": statistics.pstdev(scores) if len(scores) > 1 else 0.0,
        "invalid": sum(p is None for p in picks) / len(flat),
        **run_stats(results, latency),
    }
    print(f"Score: {summary['score']:.3f} (repeats: {', '.join(f'{s:.3f}' for s in scores)})")
    print_run_stats(summary, "wrong")
    write_result(args.output_file, summary)
    return 0
