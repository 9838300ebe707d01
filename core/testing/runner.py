"""``dsv conformance``: run the backend conformance suite and write a report.

    dsv conformance --device cuda [--kernels sparse_mla_decode=flashmla_decode,...] [--tiers ops,layers]
                    [--quick] [--report out/conformance]

Exit status: 0 when nothing failed (passes and "not supported" only), 1 on any failure, 2 on a bad request
or when the backend named by ``--device`` cannot run here.
Also runnable as ``python -m dsv.testing.runner``.
"""

from __future__ import annotations

import argparse
import sys
import time

from dsv.testing.case import TIERS
from dsv.testing.report import FAIL, NOT_SUPPORTED, PASS, Result, summarize, to_json, write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default=None, help="backend to test (its --device name); default: every backend found"
    )
    p.add_argument(
        "--kernels",
        action="append",
        metavar="OP=NAME[,OP=NAME]",
        help="kernels to test for these ops (default: every kernel of every op, each separately); "
        "the first one named per op is also used by the layers and model tiers",
    )
    p.add_argument(
        "--ops", default=None, metavar="OP[,OP]", help="run the ops tier for these operations only"
    )
    p.add_argument(
        "--tiers",
        default=",".join(TIERS),
        metavar="TIER[,TIER]",
        help=f"tiers to run (default: {','.join(TIERS)})",
    )
    p.add_argument("--quick", action="store_true", help="reduced grid")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed calls per ops case after the compared one (median reported; default 2)",
    )
    p.add_argument("--report", default=None, metavar="PATH", help="write PATH.json and PATH.md")
    p.add_argument("--list", action="store_true", help="list the planned items and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="print only failures and the summary")


def _line(r: Result) -> str:
    label = {PASS: "ok", NOT_SUPPORTED: "not supported", FAIL: "FAIL"}[r.outcome]
    stats = ""
    if r.max_err is not None:
        stats = f"  max {r.max_err:.2e} mean {r.mean_err:.2e} ratio {r.ratio:.2f}"
    if r.time_ms is not None:
        stats += f"  {r.time_ms:.2f} ms"
    why = f"\n      {r.reason}" if r.reason and r.outcome != PASS else ""
    return f"  {label:13s} {r.name}{stats}{why}"


def run(args: argparse.Namespace) -> int:
    from dsv.testing.suite import Runner, UsageError, find_targets, parse_kernels, plan

    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    try:
        bad = set(tiers) - set(TIERS)
        if bad:
            raise UsageError(f"unknown tier(s) {sorted(bad)}; tiers are {', '.join(TIERS)}")
        targets = find_targets(args.device)
        ops = [o.strip() for o in args.ops.split(",")] if args.ops else None
        items = plan(targets, tiers, args.quick, parse_kernels(args.kernels), ops)
    except UsageError as exc:
        print(f"dsv conformance: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for item in items:
            print(item.id)
        return 0
    runner, results, start = Runner(args.repeats), [], time.perf_counter()
    for item in items:
        r = runner.run(item)
        results.append(r)
        if not args.quiet or r.outcome == FAIL:
            print(_line(r), flush=True)
    elapsed = time.perf_counter() - start
    for backend, counts in summarize(results).items():
        print(
            f"{backend}: {counts[PASS]} passed, {counts[NOT_SUPPORTED]} not supported, {counts[FAIL]} failed"
        )
    print(f"{len(results)} results in {elapsed:.1f}s")
    if args.report:
        report = to_json(
            results,
            [t.describe() for t in targets],
            {k: v for k, v in vars(args).items() if not k.startswith("_")},
        )
        json_path, md_path = write_report(args.report, report)
        print(f"report: {json_path} and {md_path}")
    if any(r.outcome == FAIL for r in results):
        return 1
    unusable = [t for t in targets if t.backend is None]
    if args.device and unusable:  # asked for one backend and could not test it: not a pass
        print(
            f"dsv conformance: backend {args.device!r} is not usable here ({unusable[0].unusable}); "
            "only the contract checks that need no device ran",
            file=sys.stderr,
        )
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv conformance", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
