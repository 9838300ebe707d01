"""``dsv backends``: every backend found, whether it can run here and why, and the kernels it offers."""

from __future__ import annotations

import argparse
import json

from dsv.backend.interface import OPS
from dsv.backend.registry import FoundBackend, discover, load_backend


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--require", metavar="NAME", help="exit non-zero unless backend NAME is usable")


def describe(found: FoundBackend) -> dict:
    """One backend's row: probe answer and, when usable, its kernels per operation."""
    row = {
        "name": found.name,
        "distribution": found.distribution,
        "available": found.available,
        "reason": found.reason,
        "api_version": found.probe.api_version if found.probe else None,
        "score": found.probe.score if found.probe else None,
        "kernels": {},
    }
    if found.available:
        try:
            caps = load_backend(found).capabilities()
        except Exception as exc:  # a backend that probes fine but fails to load is reported, not fatal
            row["available"], row["reason"] = False, f"failed to load: {type(exc).__name__}: {exc}"
            return row
        row["kernels"] = {
            op: [
                {"name": k.name, "available": k.available, "reason": k.reason}
                for k in caps.kernels.get(op, [])
            ]
            for op in OPS
        }
    return row


def run(args: argparse.Namespace) -> int:
    rows = [describe(f) for f in discover()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            state = "available" if row["available"] else "NOT available"
            print(
                f"{row['name']:10s} {state:14s} {row['distribution']} (API {row['api_version']}): {row['reason']}"
            )
            for op, kernels in row["kernels"].items():
                names = ", ".join(
                    k["name"] + ("" if k["available"] else f" [unavailable: {k['reason']}]") for k in kernels
                )
                print(f"    {op:22s} {names or '-'}")
    if args.require:
        match = [r for r in rows if r["name"] == args.require]
        if not match or not match[0]["available"]:
            why = match[0]["reason"] if match else "not installed"
            print(f"required backend {args.require!r} is not usable: {why}")
            return 1
    return 0
