"""Backend discovery through the ``dsv.backends`` entry-point group, probing and selection."""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from importlib.metadata import entry_points

from dsv.backend.interface import BACKEND_API_VERSION, Backend, ProbeResult

log = logging.getLogger(__name__)
GROUP = "dsv.backends"


class BackendError(RuntimeError):
    """No usable backend, or the one asked for cannot be used (the message says what was probed)."""


@dataclass(frozen=True)
class FoundBackend:
    """A discovered backend and its probe answer (``error`` when the probe itself failed)."""

    name: str
    distribution: str
    probe: ProbeResult | None
    error: str = ""

    @property
    def available(self) -> bool:
        return self.probe is not None and self.probe.available and self.api_ok

    @property
    def api_ok(self) -> bool:
        return self.probe is not None and self.probe.api_version == BACKEND_API_VERSION

    @property
    def reason(self) -> str:
        if self.probe is None:
            return f"probe failed: {self.error}"
        if not self.api_ok:
            return (
                f"built for backend API {self.probe.api_version}, this dsv speaks {BACKEND_API_VERSION}; "
                "install a matching version of the backend package"
            )
        return self.probe.reason


def discover() -> list[FoundBackend]:
    """Probe every backend registered under ``dsv.backends`` (the built-in ``cpu`` one always included).

    ``DSV_BACKENDS`` (comma-separated names) restricts discovery, like vLLM's plugin allow-list.
    Probe exceptions are recorded as reasons, never raised.
    """
    allowed = {n.strip() for n in os.environ.get("DSV_BACKENDS", "").split(",") if n.strip()}
    found: dict[str, FoundBackend] = {}
    eps = list(entry_points(group=GROUP))
    for ep in eps:
        if allowed and ep.name not in allowed:
            continue
        dist = ep.dist.name if ep.dist is not None else "?"
        try:
            result = ep.load()()
            found[ep.name] = FoundBackend(ep.name, dist, result)
        except Exception as exc:  # a broken plugin must not take the others down
            found[ep.name] = FoundBackend(ep.name, dist, None, f"{type(exc).__name__}: {exc}")
    if "cpu" not in found and (not allowed or "cpu" in allowed):
        # Running from a source tree without installed metadata: the reference backend is built in.
        from dsv.backend.reference import probe

        found["cpu"] = FoundBackend("cpu", "dsv", probe())
    return sorted(found.values(), key=lambda f: f.name)


def load_backend(found: FoundBackend, device: str | None = None) -> Backend:
    """Import and instantiate the chosen backend class, checking its API version."""
    if not found.available:
        raise BackendError(f"backend {found.name!r} is not usable here: {found.reason}")
    module_name, _, cls_name = found.probe.backend_class.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    if getattr(cls, "api_version", None) != BACKEND_API_VERSION:
        raise BackendError(
            f"backend {found.name!r} class {found.probe.backend_class} speaks API "
            f"{getattr(cls, 'api_version', None)}, dsv needs {BACKEND_API_VERSION}"
        )
    return cls(device) if device else cls()


def select_backend(name: str | None = None, device: str | None = None) -> Backend:
    """The backend named ``name`` (``--device``), or the available one with the highest score."""
    found = discover()
    if name:
        match = [f for f in found if f.name == name]
        if not match:
            probed = ", ".join(f"{f.name} ({'ok' if f.available else f.reason})" for f in found)
            raise BackendError(
                f"no backend named {name!r} is installed. Probed: {probed}. "
                f"Install the matching package (e.g. dsv-{name}) to use --device {name}."
            )
        return load_backend(match[0], device)
    usable = [f for f in found if f.available]
    if not usable:
        raise BackendError("no usable backend: " + "; ".join(f"{f.name}: {f.reason}" for f in found))
    best = max(usable, key=lambda f: f.probe.score)
    log.info("selected backend %s (%s)", best.name, best.reason)
    return load_backend(best, device)
