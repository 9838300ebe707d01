"""Contract tier: what a backend package must get right before any kernel runs; needs no accelerator.

Each check raises :class:`ContractError` with the problem, or returns a short note for the report.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

import torch

from dsv.backend.interface import (
    BACKEND_API_VERSION,
    OPS,
    Backend,
    Capabilities,
    KernelUnavailable,
    ProbeResult,
)
from dsv.backend.reference import REFERENCE_OPS
from dsv.backend.registry import GROUP, FoundBackend

#: Top-level modules of vendor SDKs; a probe must answer without importing any of them.
VENDOR_SDKS = (
    "torch_npu",
    "acl",
    "aiter",
    "flash_mla",
    "flash_attn",
    "flash_attn_interface",
    "deep_gemm",
    "deep_ep",
    "tilelang",
    "sgl_kernel",
    "vllm",
    "flashinfer",
    "cupy",
    "pycuda",
    "cuda",
    "hip",
    "amdsmi",
    "pynvml",
)
PROBE_SECONDS = 10.0  # "cheap": a probe may look for a driver, it must not build or load kernels
DIST_BACKENDS = ("nccl", "hccl", "gloo", "mpi", "xccl", "ucc")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, None)


class ContractError(AssertionError):
    """A broken promise of the backend contract."""


@dataclass(frozen=True)
class ContractCheck:
    """One contract check; ``needs_backend`` checks instantiate the backend, so they need it usable here."""

    id: str
    what: str
    needs_backend: bool
    run: Callable[[FoundBackend, Backend | None], str]


_PROBE_SCRIPT = """
import importlib, importlib.abc, json, sys, time
blocked = set(sys.argv[2].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"vendor SDK {name!r} imported by the probe (blocked by the conformance suite)")
sys.meta_path.insert(0, Block())
module, _, attr = sys.argv[1].partition(":")
start = time.perf_counter()
obj = importlib.import_module(module)
for part in attr.split("."):
    obj = getattr(obj, part)
r = obj()
print(json.dumps({"name": r.name, "available": r.available, "reason": r.reason,
                  "seconds": time.perf_counter() - start}))
"""


def entry_point_value(name: str) -> str:
    """``module:attr`` registered under ``dsv.backends`` for ``name`` (the built-in probe for ``cpu``)."""
    for ep in entry_points(group=GROUP):
        if ep.name == name:
            return ep.value
    if name == "cpu":
        return "dsv.backend.reference:probe"
    raise ContractError(f"no entry point named {name!r} in group {GROUP}")


def check_entry_point(found: FoundBackend, _: Backend | None) -> str:
    """In a fresh interpreter with every vendor SDK import blocked, the entry point imports and answers."""
    value = entry_point_value(found.name)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE_SCRIPT, value, ",".join(VENDOR_SDKS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ContractError(f"entry point {value} fails without the vendor SDK: {last}")
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    if answer["seconds"] > PROBE_SECONDS:
        raise ContractError(
            f"probe took {answer['seconds']:.1f}s (limit {PROBE_SECONDS:.0f}s): it must be cheap"
        )
    return f"{value} answered in {answer['seconds'] * 1000:.0f} ms: available={answer['available']}"


def check_probe(found: FoundBackend, _: Backend | None) -> str:
    """The probe returns a well-formed :class:`ProbeResult` for its own name."""
    p = found.probe
    if p is None:
        raise ContractError(f"probe raised: {found.error}")
    if not isinstance(p, ProbeResult):
        raise ContractError(f"probe returned {type(p).__name__}, expected dsv.backend.interface.ProbeResult")
    if p.name != found.name:
        raise ContractError(f"probe answers for {p.name!r} but is registered as {found.name!r}")
    if not isinstance(p.available, bool) or not isinstance(p.score, int):
        raise ContractError("ProbeResult.available must be a bool and score an int")
    if not (isinstance(p.reason, str) and p.reason.strip()):
        raise ContractError("ProbeResult.reason must say why (or what device was found)")
    module, _, cls = p.backend_class.partition(":")
    if not module or not cls:
        raise ContractError(f"backend_class {p.backend_class!r} is not 'module:Class'")
    return f"available={p.available}: {p.reason}"


def check_api_version(found: FoundBackend, backend: Backend | None) -> str:
    """Probe and class speak this core's backend API version."""
    if found.probe is None or found.probe.api_version != BACKEND_API_VERSION:
        got = found.probe.api_version if found.probe else None
        raise ContractError(f"probe says API {got}, this dsv speaks {BACKEND_API_VERSION}")
    if backend is not None and backend.api_version != BACKEND_API_VERSION:
        raise ContractError(f"class says API {backend.api_version}, this dsv speaks {BACKEND_API_VERSION}")
    return f"API {BACKEND_API_VERSION}"


def check_capabilities(found: FoundBackend, backend: Backend | None) -> str:
    """Capabilities are typed, name real things, and give every operation at least one available kernel."""
    caps = backend.capabilities()
    if not isinstance(caps, Capabilities):
        raise ContractError(f"capabilities() returned {type(caps).__name__}")
    if backend.name != found.name:
        raise ContractError(f"Backend.name is {backend.name!r}, registered as {found.name!r}")
    try:
        torch.device(caps.torch_device)
    except (RuntimeError, TypeError) as exc:
        raise ContractError(f"torch_device {caps.torch_device!r} is not a torch device: {exc}") from exc
    problems = []
    if caps.dist_backend not in DIST_BACKENDS:
        problems.append(f"dist_backend {caps.dist_backend!r} not one of {DIST_BACKENDS}")
    if caps.fp8_dtype not in FP8_DTYPES:
        problems.append(f"fp8_dtype {caps.fp8_dtype} is not e4m3fn, e4m3fnuz or None")
    if not caps.kv_layouts or set(caps.kv_layouts) - {"float", "fp8"}:
        problems.append(f"kv_layouts {caps.kv_layouts} must be a non-empty subset of ('float', 'fp8')")
    if caps.page_sizes is not None and (
        not caps.page_sizes or any(not isinstance(p, int) or p < 1 for p in caps.page_sizes)
    ):
        problems.append(f"page_sizes {caps.page_sizes} must be None or positive ints")
    if not isinstance(caps.graph_capture, bool):
        problems.append("graph_capture must be a bool")
    for op in OPS:
        kernels = caps.kernels.get(op, [])
        names = [k.name for k in kernels]
        if not any(k.available for k in kernels):
            problems.append(f"{op}: no available kernel")
        if len(set(names)) != len(names):
            problems.append(f"{op}: duplicate kernel names {names}")
        for k in kernels:
            if k.op != op:
                problems.append(f"{op}: kernel {k.name!r} says op {k.op!r}")
            if k.available and not callable(k.fn):
                problems.append(f"{op}: available kernel {k.name!r} has no callable fn")
            if not k.available and not k.reason.strip():
                problems.append(f"{op}: unavailable kernel {k.name!r} gives no reason")
    unknown = set(caps.kernels) - set(OPS)
    if unknown:
        problems.append(f"kernels for unknown operations {sorted(unknown)}")
    if problems:
        raise ContractError("; ".join(problems))
    n = sum(len(v) for v in caps.kernels.values())
    return (
        f"{caps.device_type}/{caps.torch_device}, {n} kernels, kv {caps.kv_layouts}, pages {caps.page_sizes}"
    )


def check_signatures(found: FoundBackend, backend: Backend | None) -> str:
    """Every available kernel accepts the reference op's arguments (positional, as the core calls them)."""
    problems, unchecked = [], 0
    for op, kernels in backend.capabilities().kernels.items():
        if op not in REFERENCE_OPS:
            continue
        params = list(inspect.signature(REFERENCE_OPS[op]).parameters)
        for k in kernels:
            if not k.available:
                continue
            try:
                inspect.signature(k.fn).bind(*params)
            except TypeError as exc:
                problems.append(f"{op}/{k.name}: cannot take ({', '.join(params)}): {exc}")
            except ValueError:  # builtins without a signature
                unchecked += 1
    if problems:
        raise ContractError("; ".join(problems))
    return f"all bind the reference signatures ({unchecked} not inspectable)" if unchecked else "all bind"


def check_validate(found: FoundBackend, backend: Backend | None) -> str:
    """validate() returns [] for a config it supports and named reasons for ones it does not."""
    caps = backend.capabilities()
    good = {
        "kv_cache_dtype": "fp8_e4m3" if "fp8" in caps.kv_layouts else "auto",
        "page_size": (caps.page_sizes or (64,))[0],
    }
    reasons = backend.validate(good)
    if reasons != []:
        raise ContractError(f"validate({good}) should be [] but is {reasons!r}")
    bad = {"nsa_decode": "no-such-kernel", "page_size": 3 if caps.page_sizes else 64}
    reasons = backend.validate(bad)
    if not isinstance(reasons, list) or not reasons or not all(isinstance(r, str) and r for r in reasons):
        raise ContractError(f"validate({bad}) must return a non-empty list of reasons, got {reasons!r}")
    if not any("no-such-kernel" in r for r in reasons):
        raise ContractError(f"validate() reasons do not name the unknown kernel: {reasons!r}")
    return f"{len(reasons)} reason(s) for an impossible config"


def check_kernel_lookup(found: FoundBackend, backend: Backend | None) -> str:
    """kernel() resolves defaults and refuses unknown names with KernelUnavailable; ops() builds a table."""
    for op in OPS:
        k = backend.kernel(op)
        if not k.available:
            raise ContractError(f"kernel({op!r}) returned unavailable kernel {k.name!r}")
    try:
        backend.kernel(OPS[0], "no-such-kernel")
    except KernelUnavailable:
        pass
    else:
        raise ContractError("kernel(op, 'no-such-kernel') did not raise KernelUnavailable")
    return "defaults: " + ", ".join(f"{op}={name}" for op, name in backend.ops().describe().items())


CONTRACT_CHECKS: tuple[ContractCheck, ...] = (
    ContractCheck("entry_point", "imports and answers without vendor SDKs", False, check_entry_point),
    ContractCheck("probe", "returns a well-formed ProbeResult", False, check_probe),
    ContractCheck("api_version", f"speaks backend API {BACKEND_API_VERSION}", False, check_api_version),
    ContractCheck("capabilities", "well-formed, every op has a kernel", True, check_capabilities),
    ContractCheck("kernel_signatures", "kernels take the reference arguments", True, check_signatures),
    ContractCheck("validate", "returns reasons, not a boolean", True, check_validate),
    ContractCheck("kernel_lookup", "defaults resolve, unknown names refused", True, check_kernel_lookup),
)
