"""dsv: a hardware-portable inference runtime for DeepSeek-V3.2."""

from __future__ import annotations

__version__ = "0.1.0"
