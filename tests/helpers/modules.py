"""Making an optional package look installed or absent to ``importlib.util.find_spec``, without importing it."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys

import pytest


def fake_module_presence(monkeypatch: pytest.MonkeyPatch, name: str, present: bool) -> None:
    """``find_spec(name)`` finds a (fake, empty) spec when ``present``, else nothing; a loaded copy is dropped
    from ``sys.modules`` for the test."""
    real = importlib.util.find_spec

    def find_spec(module: str, package: str | None = None):
        if module == name:
            return importlib.machinery.ModuleSpec(module, None) if present else None
        return real(module, package)

    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
