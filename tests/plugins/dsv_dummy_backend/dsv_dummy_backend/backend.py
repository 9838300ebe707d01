"""The dummy backend: reference kernels, tie-breaking variants, an unavailable kernel and a planted fault."""

from __future__ import annotations

import os

import torch

from dsv.backend.interface import Backend, Capabilities, Kernel
from dsv.backend.reference import REFERENCE_OPS, reference_kernel
from dsv.ops.attention import sparse_mla
from dsv.ops.indexer import indexer_logits, topk_positions
from dsv.ops.kv_cache import MLACacheLayer
from dsv.ops.moe import moe_route
from dsv_dummy_backend import PLANTED_FAULT_ENV


def indexer_topk_reversed(q, weights, cache, meta, topk: int) -> torch.Tensor:
    """The reference top-k, but ties broken towards later keys and one -1 moved to the front of the row:
    a legitimate answer the suite must accept (top-k is a set)."""
    scores = indexer_logits(q, weights, cache, meta)
    last = scores.shape[1] - 1
    picked = topk_positions(scores.flip(-1), topk)
    return torch.where(picked >= 0, last - picked, picked).roll(1, dims=1)


def moe_route_reversed(logits, bias, top_k, n_group, topk_group, renormalize, scaling):
    """The reference routing computed on the experts in reverse order (groups stay groups): ties between
    experts or groups break the other way, which the suite must accept."""
    rev_bias = None if bias is None else bias.flip(-1)
    weights, ids = moe_route(logits.flip(-1), rev_bias, top_k, n_group, topk_group, renormalize, scaling)
    return weights, logits.shape[-1] - 1 - ids


def sparse_mla_drop_last_key(q, cache: MLACacheLayer, indices: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """PLANTED FAULT: ignores the last valid key of every row. The suite must report it as a failure."""
    valid = indices >= 0
    last = (valid.cumsum(1) == valid.sum(1, keepdim=True)) & valid
    return sparse_mla(q, cache, indices.masked_fill(last, -1), sm_scale)


def _kernels() -> dict[str, list[Kernel]]:
    kernels = {op: [reference_kernel(op)] for op in REFERENCE_OPS}
    for op in ("indexer_topk_prefill", "indexer_topk_decode"):
        kernels[op].insert(
            0, Kernel(op, "reversed_ties", indexer_topk_reversed, description="tie-break variant")
        )
    kernels["moe_route"].insert(0, Kernel("moe_route", "reversed_ties", moe_route_reversed))
    planted = os.environ.get(PLANTED_FAULT_ENV) == "1"
    kernels["sparse_mla_decode"].append(
        Kernel(
            "sparse_mla_decode",
            "planted_fault",
            sparse_mla_drop_last_key,
            available=planted,
            reason="" if planted else f"set {PLANTED_FAULT_ENV}=1 to enable the deliberately wrong kernel",
            description="drops the last valid key of every row",
        )
    )
    kernels["mha_prefill"].append(
        Kernel(
            "mha_prefill",
            "dummy_sdk",
            None,
            available=False,
            reason="the (imaginary) dummy SDK is not installed",
        )
    )
    return kernels


class DummyBackend(Backend):
    """Reference math on the CPU; declares no FP8 KV layout, so those cases are reported as not supported."""

    name = "dummy"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def capabilities(self) -> Capabilities:
        return Capabilities(
            device_type="cpu",
            torch_device=self.device,
            dist_backend="gloo",
            fp8_dtype=torch.float8_e4m3fn,
            kv_layouts=("float",),
            page_sizes=None,
            graph_capture=False,
            kernels=_kernels(),
        )
