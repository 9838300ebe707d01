"""dsv: a hardware-portable inference runtime for DeepSeek-V3.2."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

# Imported on first use so that `import dsv` stays cheap (no torch import for the CLI's --help).
_LAZY = {"LLM": "dsv.llm", "SamplingParams": "dsv.engine.sampling"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsv' has no attribute {name!r}")
