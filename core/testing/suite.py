"""Planning and running conformance items: (backend, tier, kernel, case) -> :class:`Result`.

Both front ends use this module: ``dsv conformance`` runs every planned item in order, the pytest plugin turns
each item into one test. The reference side of an ops case is computed once, on the CPU in fp32, and shared by
every backend and kernel that runs it; that of a layers or model case follows each backend's discrete choices
(:mod:`dsv.testing.replay`), so it is computed per run, on the CPU in the case's dtypes.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dsv.backend.interface import OPS, Backend, Capabilities, KernelUnavailable
from dsv.backend.reference import REFERENCE_OPS, ReferenceBackend
from dsv.backend.registry import FoundBackend, discover, load_backend
from dsv.testing.case import TIERS, Case, Inputs
from dsv.testing.cases import all_cases
from dsv.testing.contract import CONTRACT_CHECKS, ContractCheck, ContractError
from dsv.testing.replay import DecisionMismatch, Replay, recording
from dsv.testing.report import FAIL, NOT_SUPPORTED, PASS, Result

DEFAULT_KERNEL = "default"


class UsageError(ValueError):
    """A request the suite cannot honour (unknown backend, operation or kernel name)."""


@dataclass
class Target:
    """A backend to test: its probe answer and, when usable here, the loaded instance."""

    found: FoundBackend
    backend: Backend | None
    unusable: str = ""  # why no instance (probe said no, or loading failed)

    @property
    def name(self) -> str:
        return self.found.name

    @property
    def caps(self) -> Capabilities:
        return self.backend.capabilities()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.found.distribution,
            "available": self.backend is not None,
            "reason": self.unusable or self.found.reason,
            "torch_device": self.caps.torch_device if self.backend is not None else None,
        }


@dataclass(frozen=True)
class Item:
    """One planned test. ``case`` is None for a placeholder already decided as not supported (``reason``)."""

    target: Target
    tier: str
    op: str
    kernel: str
    case: Case | ContractCheck | None
    reason: str = ""
    choices: tuple[tuple[str, str], ...] = ()  # (op, kernel) picked for the layers and model tiers

    @property
    def case_id(self) -> str:
        if isinstance(self.case, ContractCheck):
            return self.case.what
        return self.case.id if self.case is not None else "*"

    @property
    def id(self) -> str:
        return f"{self.target.name}/{self.tier}/{self.op}[{self.kernel}]/{self.case_id}"


def find_targets(device: str | None = None) -> list[Target]:
    """The backend named ``device``, or every backend found; loaded when usable here."""
    everything = discover()
    found = [f for f in everything if f.name == device] if device else everything
    if not found:
        names = ", ".join(f.name for f in everything) or "none"
        raise UsageError(f"no backend named {device!r} is installed (found: {names})")
    targets = []
    for f in found:
        if not f.available:
            targets.append(Target(f, None, f.reason))
            continue
        try:
            targets.append(Target(f, load_backend(f)))
        except Exception as exc:  # reported as the reason every non-contract item is not supported
            targets.append(Target(f, None, f"failed to load: {type(exc).__name__}: {exc}"))
    return targets


def parse_kernels(spec: Iterable[str] | None) -> dict[str, list[str]]:
    """``["op=name,op=name2", ...]`` -> {op: [names]} (an op may be given several kernels)."""
    out: dict[str, list[str]] = {}
    for part in ",".join(spec or []).split(","):
        if not part.strip():
            continue
        op, sep, name = part.partition("=")
        op, name = op.strip(), name.strip()
        if not sep or not name:
            raise UsageError(f"--kernels wants op=name, got {part!r}")
        if op not in OPS:
            raise UsageError(f"--kernels: unknown operation {op!r}; operations are {', '.join(OPS)}")
        out.setdefault(op, []).append(name)
    return out


def _kernel_items(t: Target, case: Case, chosen: dict[str, list[str]]) -> list[Item]:
    listed = t.caps.kernels.get(case.op, [])
    if case.op in chosen:
        known = {k.name: k for k in listed}
        for name in chosen[case.op]:
            if name not in known:
                names = ", ".join(known) or "none"
                raise UsageError(f"{t.name}: no kernel named {name!r} for {case.op}; known: {names}")
        listed = [known[n] for n in chosen[case.op]]
    return [
        Item(t, "ops", case.op, k.name, case, "" if k.available else f"kernel unavailable here: {k.reason}")
        for k in listed
    ]


def plan(
    targets: list[Target],
    tiers: Iterable[str] = TIERS,
    quick: bool = False,
    kernels: dict[str, list[str]] | None = None,
    ops: Iterable[str] | None = None,
) -> list[Item]:
    """Every item to run, in report order. ``kernels`` picks the kernels per op (default: all of them);
    ``ops`` restricts the ops tier to those operations."""
    tiers = [t for t in TIERS if t in set(tiers)]
    chosen = kernels or {}
    only = set(ops or [])
    unknown = only - set(OPS)
    if unknown:
        raise UsageError(f"unknown operation(s) {sorted(unknown)}; operations are {', '.join(OPS)}")
    cases = all_cases([t for t in tiers if t != "contract"], quick)
    picks = tuple((op, names[0]) for op, names in sorted(chosen.items()))
    label = ",".join(f"{op}={name}" for op, name in picks) or DEFAULT_KERNEL
    items: list[Item] = []
    for t in targets:
        if "contract" in tiers:
            for check in CONTRACT_CHECKS:
                skip = t.unusable if check.needs_backend and t.backend is None else ""
                items.append(Item(t, "contract", check.id, "-", check, skip))
        for tier in tiers:
            if tier == "contract":
                continue
            if t.backend is None:
                items.append(Item(t, tier, "*", "-", None, f"backend not usable here: {t.unusable}"))
                continue
            for case in cases:
                if case.tier != tier or (tier == "ops" and only and case.op not in only):
                    continue
                if tier == "ops":
                    items += _kernel_items(t, case, chosen)
                else:
                    items.append(Item(t, tier, case.op, label, case, choices=picks))
    return items


def _sync(device: str) -> None:
    if torch.device(device).type != "cpu":
        acc = getattr(torch, "accelerator", None)
        if acc is not None and acc.is_available():
            acc.synchronize()


def _unsupported_need(case: Case, caps: Capabilities) -> str:
    need = case.needs
    if need.kv_layout and need.kv_layout not in caps.kv_layouts:
        return f"KV layout {need.kv_layout!r} not declared (kv_layouts={caps.kv_layouts})"
    if need.page_size and caps.page_sizes is not None and need.page_size not in caps.page_sizes:
        return f"page size {need.page_size} not declared (page_sizes={caps.page_sizes})"
    return ""


def _cache_config(case: Case) -> dict[str, Any]:
    """``validate()``-style cache configuration of a layers or model case."""
    kv = "fp8_e4m3" if case.needs.kv_layout == "fp8" else "auto"
    return {
        "kv_cache_dtype": kv,
        "page_size": case.needs.page_size,
        "indexer_quant": "fp8",
        "dtype": "bfloat16",
    }


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""


class Runner:
    """Runs items; keeps the reference side of each case so it is computed once per process."""

    def __init__(self, repeats: int = 2) -> None:
        self.repeats = repeats
        self._expected: dict[str, Any] = {}

    def expected(self, case: Case) -> Any:
        if case.key not in self._expected:
            with torch.no_grad():
                args = case.build(Inputs("cpu", True, case.seed))
                impl = REFERENCE_OPS[case.op] if case.tier == "ops" else ReferenceBackend("cpu").ops()
                self._expected[case.key] = case.check.expect(case.call(impl, args), args)
        return self._expected[case.key]

    def run(self, item: Item) -> Result:
        base: dict[str, Any] = dict(
            backend=item.target.name, tier=item.tier, op=item.op, kernel=item.kernel, case=item.case_id
        )
        if item.case is None or item.reason:
            return Result(**base, outcome=NOT_SUPPORTED, reason=item.reason)
        if isinstance(item.case, ContractCheck):
            return self._contract(item.case, item.target, base)
        case = item.case
        base.update(tolerance=case.check.tolerance, why=case.check.why)
        caps = item.target.caps
        missing = _unsupported_need(case, caps)
        try:
            backend = item.target.backend
            if item.tier == "ops":
                impl = backend.kernel(case.op, item.kernel).fn
            else:  # the backend picks its defaults for the case's cache, as it does when serving
                impl = backend.ops(dict(item.choices), _cache_config(case))
        except KernelUnavailable as exc:
            missing = missing or str(exc)
        if missing:
            return Result(**base, outcome=NOT_SUPPORTED, reason=missing)
        log: list[tuple[str, Any]] = []  # the backend's discrete choices, for replay cases
        try:
            out, ms = self._call(case, recording(impl, log) if case.replay else impl, caps.torch_device)
        except (NotImplementedError, KernelUnavailable) as exc:  # a kernel may refuse a shape it lacks
            reason = f"kernel declined: {type(exc).__name__}: {exc}"
            return Result(**base, outcome=NOT_SUPPORTED, reason=reason)
        except Exception as exc:
            return Result(**base, outcome=FAIL, reason=f"raised {type(exc).__name__}: {exc}{_where(exc)}")
        try:
            expected = self.replayed(case, out, log) if case.replay else self.expected(case)
        except DecisionMismatch as exc:
            return Result(
                **base, outcome=FAIL, reason=f"discrete choice is not a near tie: {exc}", time_ms=ms
            )
        except Exception as exc:  # a bug of the suite, never of the backend: still fail loudly
            reason = f"reference side failed: {type(exc).__name__}: {exc}{_where(exc)}"
            return Result(**base, outcome=FAIL, reason=reason)
        v = case.check.compare(out, expected)
        return Result(
            **base,
            outcome=PASS if v.ok else FAIL,
            reason=v.detail,
            max_err=v.max_err,
            mean_err=v.mean_err,
            ratio=v.ratio,
            time_ms=ms,
        )

    @staticmethod
    def _contract(check: ContractCheck, target: Target, base: dict[str, Any]) -> Result:
        start = time.perf_counter()
        try:
            note = check.run(target.found, target.backend)
        except Exception as exc:  # a contract check failing in any way is a failure of the backend
            kind = "" if isinstance(exc, ContractError) else f"{type(exc).__name__}: "
            return Result(**base, outcome=FAIL, reason=f"{kind}{exc}")
        return Result(**base, outcome=PASS, reason=note, time_ms=(time.perf_counter() - start) * 1e3)

    @staticmethod
    def replayed(case: Case, out: Any, log: list[tuple[str, Any]]) -> Any:
        """The reference side of a replay case, following the backend's recorded choices and output."""
        with torch.no_grad():
            args = case.build(Inputs("cpu", True, case.seed, widen=False))
            args["backend_out"] = out
            replay = Replay(ReferenceBackend("cpu").ops(), log)
            ref_out = case.call(replay.ops, args)
            problem = replay.leftover()
            if problem:
                raise DecisionMismatch(problem)
            return case.check.expect(ref_out, args)

    def _call(self, case: Case, impl: Any, device: str) -> tuple[Any, float]:
        """The compared output, and the kernel's time: the median of ``repeats`` further calls (the first
        call may compile), or the first call's for the layers and model tiers (which includes copying the
        discrete choices to the CPU for the replay)."""
        with torch.no_grad():
            args = case.build(Inputs(device, False, case.seed))
            _sync(device)
            start = time.perf_counter()
            out = case.call(impl, args)
            _sync(device)
            times = [time.perf_counter() - start]
            if case.tier == "ops" and self.repeats > 0:
                times = []
                for _ in range(self.repeats):
                    start = time.perf_counter()
                    case.call(impl, args)
                    _sync(device)
                    times.append(time.perf_counter() - start)
        return out, sorted(times)[len(times) // 2] * 1e3
