"""Which kernels a CUDA graph can capture, and the op table the decode graphs are captured with.

A kernel that synchronizes with the host (``.tolist()``, ``.item()``, ``int(tensor)``, ``nonzero``, boolean
masks, data-dependent shapes) fails inside ``torch.cuda.graph``. The reference kernels declare this
themselves (``dsv.backend.reference.HOST_SYNC_OPS``); this table marks the vendor adapters of this package.
Prefill-only entries do not block decode graphs: they are listed so that ``Kernel.capturable`` is true.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from dsv.backend.interface import DECODE_OPS, SELECTABLE_OPS, Kernel, KernelUnavailable, OpTable
from dsv.backend.reference import HOST_SYNC_OPS
from dsv_cuda.requirements import OPT_IN, KernelConfig, unmet

log = logging.getLogger(__name__)

#: (op, kernel) -> the host synchronization that keeps it out of CUDA graphs.
HOST_SYNC: dict[tuple[str, str], str] = {
    ("fused_moe", "deep_gemm"): "the padded row count is read back with int(padded.sum())",
    ("indexer_topk_prefill", "deep_gemm"): "a boolean-mask gather of the valid slots",
    ("sparse_mla_prefill", "flashmla_prefill"): "torch.unique of the selected slots",
    ("mha_prefill", "fa3"): "max sequence lengths read back with int()",
}


def host_sync_reason(k: Kernel) -> str:
    """Why ``k`` cannot be captured ("" when it can)."""
    if k.capturable:
        return ""
    if k.name == "torch" and k.op in HOST_SYNC_OPS:
        return HOST_SYNC_OPS[k.op]
    return HOST_SYNC.get((k.op, k.name), "it synchronizes with the host")


def mark_capturable(kernels: dict[str, list[Kernel]]) -> dict[str, list[Kernel]]:
    """The kernel table with ``capturable=False`` on this package's host-syncing adapters."""
    return {
        op: [replace(k, capturable=False) if (op, k.name) in HOST_SYNC else k for k in ks]
        for op, ks in kernels.items()
    }


def decode_op_table(
    ops: OpTable,
    kernels: dict[str, list[Kernel]],
    cache_config: dict | None,
    explicit: dict[str, str],
) -> tuple[OpTable, dict[str, tuple[str, str]]]:
    """The op table to capture decode graphs with, and the replacements made ({op: (old, new)}).

    Every operation a decode forward calls must be capturable. A default kernel that is not is replaced by
    the first available capturable kernel (in preference order) that serves ``cache_config`` and may be a
    default (not ``OPT_IN``); an explicitly chosen one (``explicit``: op or ``nsa_*`` flag -> kernel) is
    refused, as is an op with no such kernel. Prefill keeps the engine's table: only decode steps replay
    graphs.

    Raises:
        KernelUnavailable: naming the kernel, why it cannot be captured, and ``--disable-cuda-graph``.
    """
    cfg = KernelConfig.from_dict(cache_config)
    chosen = {SELECTABLE_OPS.get(k, k) for k, v in explicit.items() if v}
    table = dict(ops.kernels)
    replaced: dict[str, tuple[str, str]] = {}
    for op in DECODE_OPS:
        k = table[op]
        if k.capturable:
            continue
        why = f"the {op} kernel {k.name!r} cannot be captured in a CUDA graph: {host_sync_reason(k)}"
        flag = next((f for f, o in SELECTABLE_OPS.items() if o == op), None)
        if op in chosen:
            other = f"choose another with --{flag.replace('_', '-')}, or " if flag else ""
            raise KernelUnavailable(f"cuda: {why}; {other}run with --disable-cuda-graph")
        usable = [
            c
            for c in kernels.get(op, [])
            if c.available and c.capturable and c.fn is not None and not unmet(op, c.name, cfg)
        ]
        alt = next((c for c in usable if (op, c.name) not in OPT_IN), None)
        if alt is None:
            by_name = ", ".join(c.name for c in usable)
            named = f"; capturable if chosen by name: {by_name}" if by_name else ""
            raise KernelUnavailable(
                f"cuda: {why}, and no other {op} kernel that can be captured is a default here "
                f"(known: {', '.join(c.name for c in kernels.get(op, [])) or 'none'}{named}); "
                "run with --disable-cuda-graph"
            )
        log.info("decode graphs: %s uses %s instead of %s (%s)", op, alt.name, k.name, host_sync_reason(k))
        table[op] = alt
        replaced[op] = (k.name, alt.name)
    return OpTable(table), replaced
