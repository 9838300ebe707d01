"""``dsv eval``: accuracy evals against a running OpenAI-compatible server.

``dsv eval gsm8k`` (few-shot math, last number graded) and ``dsv eval gpqa`` (multiple choice, letter graded).
Both read local files in the public datasets' formats and default to the small samples bundled with dsv.
"""

from __future__ import annotations

import argparse
import importlib

#: eval name -> (module with ``add_arguments(parser)`` and ``run(args) -> int``, help)
EVALS = {
    "gsm8k": ("dsv.server.evals.gsm8k", "few-shot grade-school math (GSM8K JSONL format)"),
    "gpqa": ("dsv.server.evals.gpqa", "four-way multiple-choice science (GPQA CSV format)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One sub-command per eval."""
    sub = p.add_subparsers(dest="eval_name", required=True)
    for name, (module, help_text) in EVALS.items():
        e = sub.add_parser(name, help=help_text, description=help_text)
        e.set_defaults(_eval_module=module)
        importlib.import_module(module).add_arguments(e)


def run(args: argparse.Namespace) -> int:
    """Run the eval the sub-command named."""
    return int(importlib.import_module(args._eval_module).run(args) or 0)
