"""Results of a conformance run and the JSON + markdown report."""

from __future__ import annotations

import json
import platform
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dsv import __version__
from dsv.backend.interface import BACKEND_API_VERSION

PASS, NOT_SUPPORTED, FAIL = "pass", "not_supported", "fail"
OUTCOMES = (PASS, NOT_SUPPORTED, FAIL)


@dataclass
class Result:
    """One case of one kernel on one backend.

    ``outcome`` is ``pass``, ``not_supported`` (with ``reason``) or ``fail`` (with ``reason``). Errors are
    absolute, in the output's units; ``ratio`` is the worst error over the allowed one (<= 1 passes).
    """

    backend: str
    tier: str
    op: str
    kernel: str
    case: str
    outcome: str
    reason: str = ""
    max_err: float | None = None
    mean_err: float | None = None
    ratio: float | None = None
    tolerance: str = ""
    why: str = ""
    time_ms: float | None = None

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.tier}/{self.op}[{self.kernel}]/{self.case}"


def summarize(results: list[Result]) -> dict[str, dict[str, int]]:
    """backend -> outcome -> count."""
    out: dict[str, dict[str, int]] = {}
    for r in results:
        out.setdefault(r.backend, dict.fromkeys(OUTCOMES, 0))[r.outcome] += 1
    return out


def per_op(results: list[Result]) -> list[dict[str, Any]]:
    """One row per (backend, tier, op, kernel): counts, worst and mean error, worst ratio, median time."""
    groups: dict[tuple[str, str, str, str], list[Result]] = defaultdict(list)
    for r in results:
        groups[(r.backend, r.tier, r.op, r.kernel)].append(r)
    rows = []
    for (backend, tier, op, kernel), rs in groups.items():
        measured = [r for r in rs if r.max_err is not None]
        times = sorted(r.time_ms for r in rs if r.time_ms is not None)
        rows.append(
            {
                "backend": backend,
                "tier": tier,
                "op": op,
                "kernel": kernel,
                **{o: sum(r.outcome == o for r in rs) for o in OUTCOMES},
                "max_err": max((r.max_err for r in measured), default=None),
                "mean_err": sum(r.mean_err for r in measured) / len(measured) if measured else None,
                "worst_ratio": max((r.ratio for r in measured if r.ratio is not None), default=None),
                "median_ms": times[len(times) // 2] if times else None,
            }
        )
    return rows


def environment() -> dict[str, Any]:
    return {
        "dsv": __version__,
        "backend_api": BACKEND_API_VERSION,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": platform.node(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def to_json(results: list[Result], backends: list[dict[str, Any]], args: dict[str, Any]) -> dict[str, Any]:
    return {
        "environment": environment(),
        "args": args,
        "backends": backends,
        "summary": summarize(results),
        "ops": per_op(results),
        "results": [asdict(r) for r in results],
    }


def _num(x: float | None, fmt: str = ".2e") -> str:
    return "-" if x is None else format(x, fmt)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(report: dict[str, Any]) -> str:
    """Human report: summary per backend, failures, per-op table, not-supported reasons, tolerances."""
    env, lines = report["environment"], []
    lines += [
        "# dsv backend conformance report",
        "",
        f"dsv {env['dsv']} (backend API {env['backend_api']}), torch {env['torch']}, {env['platform']}, "
        f"{env['created']}",
        "",
    ]
    lines += [
        "| backend | distribution | usable here | pass | not supported | fail |",
        "|---|---|---|---|---|---|",
    ]
    for b in report["backends"]:
        s = report["summary"].get(b["name"], dict.fromkeys(OUTCOMES, 0))
        usable = "yes" if b["available"] else f"no: {_cell(b['reason'])}"
        lines.append(
            f"| {b['name']} | {b['distribution']} | {usable} | {s[PASS]} | {s[NOT_SUPPORTED]} | {s[FAIL]} |"
        )
    results = report["results"]
    failures = [r for r in results if r["outcome"] == FAIL]
    lines += ["", f"## Failures ({len(failures)})", ""]
    if failures:
        lines += [
            "| backend | tier | op | kernel | case | max err | ratio | reason |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in failures:
            lines.append(
                f"| {r['backend']} | {r['tier']} | {r['op']} | {r['kernel']} | {r['case']} | "
                f"{_num(r['max_err'])} | {_num(r['ratio'], '.2f')} | {_cell(r['reason'])} |"
            )
    else:
        lines.append("None.")
    lines += [
        "",
        "## Per operation",
        "",
        "Errors are absolute; ratio = worst error / allowed error (a pass is <= 1); time is the median per "
        "case of the kernel alone.",
        "",
        "| backend | tier | op | kernel | pass | n/s | fail | max err | mean err | worst ratio | median ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["ops"]:
        lines.append(
            f"| {row['backend']} | {row['tier']} | {row['op']} | {row['kernel']} | {row[PASS]} | "
            f"{row[NOT_SUPPORTED]} | {row[FAIL]} | {_num(row['max_err'])} | {_num(row['mean_err'])} | "
            f"{_num(row['worst_ratio'], '.2f')} | {_num(row['median_ms'], '.2f')} |"
        )
    unsupported = [r for r in results if r["outcome"] == NOT_SUPPORTED]
    lines += ["", f"## Not supported ({len(unsupported)})", ""]
    if unsupported:
        lines += ["| backend | tier | op | kernel | case | reason |", "|---|---|---|---|---|---|"]
        for r in unsupported:
            lines.append(
                f"| {r['backend']} | {r['tier']} | {r['op']} | {r['kernel']} | {r['case']} | "
                f"{_cell(r['reason'])} |"
            )
    else:
        lines.append("None.")
    lines += ["", "## Tolerances", "", "| tier | op | rule | why |", "|---|---|---|---|"]
    seen = set()
    for r in results:
        key = (r["tier"], r["op"], r["tolerance"])
        if r["tolerance"] and key not in seen:
            seen.add(key)
            lines.append(f"| {r['tier']} | {r['op']} | {_cell(r['tolerance'])} | {_cell(r['why'])} |")
    lines += [
        "",
        "## All cases",
        "",
        "| backend | tier | op | kernel | case | outcome | max err | mean err | ratio | ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['backend']} | {r['tier']} | {r['op']} | {r['kernel']} | {r['case']} | {r['outcome']} | "
            f"{_num(r['max_err'])} | {_num(r['mean_err'])} | {_num(r['ratio'], '.2f')} | "
            f"{_num(r['time_ms'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def report_paths(path: str | Path) -> tuple[Path, Path]:
    """``PATH`` as a prefix: PATH.json and PATH.md (a trailing .json or .md is dropped first)."""
    p = Path(path)
    if p.suffix in (".json", ".md"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".json"), p.with_name(p.name + ".md")


def write_report(path: str | Path, report: dict[str, Any]) -> tuple[Path, Path]:
    json_path, md_path = report_paths(path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(to_markdown(report))
    return json_path, md_path
