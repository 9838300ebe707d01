"""The H200's peaks and the roofline time of a case: bytes over HBM bandwidth or FLOPs over peak, the larger."""

from __future__ import annotations

HBM_BPS, BF16_FLOPS, FP8_FLOPS = 4.8e12, 989e12, 1979e12  # H200 (SXM) data-sheet peaks, dense


def roofline_ms(nbytes: float, flops: float, peak: float) -> float:
    """Lower bound in ms of a call moving ``nbytes`` through HBM and doing ``flops`` at ``peak`` FLOP/s."""
    return max(nbytes / HBM_BPS, flops / peak) * 1e3
