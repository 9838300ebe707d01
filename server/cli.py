"""The ``dsv`` command line: one sub-command per job, each in its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: sub-command -> (module with ``add_arguments(parser)`` and ``run(args) -> int``, help)
COMMANDS = {
    "serve": ("dsv.server.cmd_serve", "OpenAI-compatible HTTP server (SGLang-style flags)"),
    "generate": ("dsv.server.cmd_generate", "generate text for one prompt (single-request loop)"),
    "backends": (
        "dsv.server.cmd_backends",
        "list the backends found, whether they can run here, and their kernels",
    ),
    "bench": ("dsv.server.cmd_bench", "benchmarks: offline engine throughput, or a running server (serving)"),
    "eval": ("dsv.server.cmd_eval", "accuracy evals (gsm8k, gpqa) against a running server"),
    "conformance": ("dsv.testing.runner", "run the backend conformance suite and write a report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv", description="DeepSeek-V3.2 inference runtime")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
