"""``dsv backends``: every backend found, whether it can run here and why, and the kernels it offers.

    dsv backends [--json] [--require NAME]

The text form is one table of backends, then per usable backend one line per operation listing its kernels:
``*`` marks the kernel used by default, unavailable ones carry their reason. ``--require NAME`` exits 1 unless
backend NAME is usable here (for scripts and CI).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from dsv.backend.interface import OPS
from dsv.backend.registry import FoundBackend, discover, load_backend


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--require", metavar="NAME", help="exit non-zero unless backend NAME is usable")


def describe(found: FoundBackend) -> dict[str, Any]:
    """One backend's row: probe answer and, when usable, its kernels per operation."""
    row: dict[str, Any] = {
        "name": found.name,
        "distribution": found.distribution,
        "available": found.available,
        "reason": found.reason,
        "api_version": found.probe.api_version if found.probe else None,
        "score": found.probe.score if found.probe else None,
        "torch_device": None,
        "kernels": {},
    }
    if not found.available:
        return row
    try:
        backend = load_backend(found)
        caps = backend.capabilities()
        defaults = {op: backend.kernel(op).name for op in OPS}
    except Exception as exc:  # a backend that probes fine but fails to load is reported, not fatal
        row["available"], row["reason"] = False, f"failed to load: {type(exc).__name__}: {exc}"
        return row
    row["torch_device"] = caps.torch_device
    row["kv_layouts"], row["page_sizes"] = list(caps.kv_layouts), caps.page_sizes
    row["kernels"] = {
        op: [
            {"name": k.name, "available": k.available, "reason": k.reason, "default": k.name == defaults[op]}
            for k in caps.kernels.get(op, [])
        ]
        for op in OPS
    }
    return row


def _table(rows: list[dict[str, Any]]) -> list[str]:
    head = ("backend", "distribution", "API", "usable", "why / device")
    body = [
        (r["name"], r["distribution"], str(r["api_version"]), "yes" if r["available"] else "no", r["reason"])
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(4)]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[4] for line in [head, *body]]


def _kernels(row: dict[str, Any]) -> list[str]:
    lines = [
        f"{row['name']} ({row['torch_device']}; KV layouts {row['kv_layouts']}, page sizes "
        f"{row['page_sizes'] or 'any'}):"
    ]
    for op, kernels in row["kernels"].items():
        names = [
            ("*" if k["default"] else "")
            + k["name"]
            + ("" if k["available"] else f" [unavailable: {k['reason']}]")
            for k in kernels
        ]
        lines.append(f"    {op:22s} {', '.join(names) or '-'}")
    return lines


def run(args: argparse.Namespace) -> int:
    rows = [describe(f) for f in discover()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("\n".join(_table(rows)))
        for row in rows:
            if row["kernels"]:
                print()
                print("\n".join(_kernels(row)))
    if args.require:
        match = [r for r in rows if r["name"] == args.require]
        if not match or not match[0]["available"]:
            why = match[0]["reason"] if match else "not installed"
            print(f"required backend {args.require!r} is not usable: {why}")
            return 1
    return 0
