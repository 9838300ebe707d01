"""What each vendor kernel needs from the serving configuration (KV layout and dtype, page size, indexer
cache format), so that ``validate`` can refuse a choice with the reason and the defaults never pick a kernel
that would refuse at its first call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
}


def _dtype_name(value: Any) -> str:
    """'bfloat16' / 'float16' / 'float32' from a torch dtype or a CLI string; 'auto' means bf16 (V3.2)."""
    if value is None:
        return "bfloat16"
    name = str(value).replace("torch.", "").lower()
    if name == "auto":
        return "bfloat16"
    return _DTYPE_ALIASES.get(name, name)


@dataclass(frozen=True)
class KernelConfig:
    """The part of a serving config that kernels care about.

    Attributes:
        layout: MLA cache layout, "float" or "fp8" (FlashMLA's 656-byte rows).
        kv_dtype: element dtype of a float cache ("bfloat16", "float16", "float32").
        page_size: tokens per KV page, None when not decided yet.
        indexer_fp8: whether the indexer key cache is FP8 (132 bytes/token) or unquantized.
        dtype: the model's activation dtype ("bfloat16", "float16", "float32").
    """

    layout: str = "float"
    kv_dtype: str = "bfloat16"
    page_size: int | None = None
    indexer_fp8: bool = True
    dtype: str = "bfloat16"

    @classmethod
    def from_dict(cls, config: dict[str, Any] | None) -> KernelConfig:
        """From ``validate``-style keys: kv_cache_dtype, dtype, page_size, indexer_quant."""
        config = config or {}
        kv = str(config.get("kv_cache_dtype") or "auto")
        layout = "fp8" if kv == "fp8_e4m3" else "float"
        kv_dtype = "bfloat16" if kv == "bf16" else _dtype_name(config.get("dtype"))
        page = config.get("page_size")
        return cls(
            layout=layout,
            kv_dtype=kv_dtype,
            page_size=int(page) if page is not None else None,
            indexer_fp8=str(config.get("indexer_quant") or "fp8") == "fp8",
            dtype=_dtype_name(config.get("dtype")),
        )


@dataclass(frozen=True)
class Requirement:
    """Constraints of one kernel; ``None`` fields are unconstrained."""

    layout: str | None = None
    half_kv: bool = False  # a float-layout cache must hold bf16/fp16
    page_size: int | None = None
    indexer_fp8: bool = False
    bf16_model: bool = False  # the model's activations must be bf16
    hint: str = ""


HALF = ("bfloat16", "float16")

#: (op, kernel) -> what it needs. Kernels not listed run with any configuration.
REQUIREMENTS: dict[tuple[str, str], Requirement] = {
    ("sparse_mla_decode", "flashmla_decode"): Requirement(
        layout="fp8",
        page_size=64,
        hint="FlashMLA's sparse decode reads only the FP8 cache, in 64-token pages",
    ),
    ("sparse_mla_decode", "fa3"): Requirement(layout="float", half_kv=True, hint="FA3 reads a bf16 cache"),
    ("sparse_mla_prefill", "fa3"): Requirement(layout="float", half_kv=True, hint="FA3 reads a bf16 cache"),
    ("sparse_mla_prefill", "flashmla_prefill"): Requirement(half_kv=True, hint="FlashMLA prefill reads bf16"),
    # Decode reads FlashMLA's FP8 rows too (the "ws" producer dequantizes them; Triton below 4 blocks a split).
    ("sparse_mla_decode", "tilelang"): Requirement(
        half_kv=True, hint="dsv's TileLang sparse MLA reads a bf16 cache or FlashMLA's FP8 rows"
    ),
    ("sparse_mla_prefill", "tilelang"): Requirement(
        layout="float", half_kv=True, hint="dsv's TileLang sparse MLA reads a bf16 cache"
    ),
    ("indexer_topk_prefill", "deep_gemm"): Requirement(indexer_fp8=True),
    ("indexer_topk_decode", "deep_gemm"): Requirement(
        indexer_fp8=True, page_size=64, hint="DeepGEMM's paged indexer reads 64-token blocks"
    ),
    ("fused_moe", "scaled_grouped_mm"): Requirement(
        bf16_model=True, hint="torch's grouped GEMMs take and return bf16"
    ),
    ("fused_moe", "grouped_mm"): Requirement(
        bf16_model=True, hint="torch's grouped GEMMs take and return bf16"
    ),
}

#: Kernels never picked by default, only by name: their numerics differ from the reference beyond its own
#: FP8 rounding (row-wise requantized experts), or they are not measured against the default yet.
OPT_IN: frozenset[tuple[str, str]] = frozenset(
    {("fused_moe", "scaled_grouped_mm"), ("fused_moe", "grouped_mm")}
)


def unmet(op: str, kernel: str, cfg: KernelConfig) -> list[str]:
    """Reasons why ``kernel`` for ``op`` cannot serve ``cfg`` (empty when it can)."""
    req = REQUIREMENTS.get((op, kernel))
    if req is None:
        return []
    why: list[str] = []
    if req.layout == "fp8" and cfg.layout != "fp8":
        why.append(f"{kernel} needs the FP8 KV layout (--kv-cache-dtype fp8_e4m3)")
    if req.layout == "float" and cfg.layout != "float":
        why.append(f"{kernel} needs the bf16 KV layout (--kv-cache-dtype bf16), not fp8_e4m3")
    if req.half_kv and cfg.layout == "float" and cfg.kv_dtype not in HALF:
        why.append(f"{kernel} needs a bf16/fp16 KV cache, this one would hold {cfg.kv_dtype}")
    if req.page_size is not None and cfg.page_size is not None and cfg.page_size != req.page_size:
        why.append(f"{kernel} needs --page-size {req.page_size}, got {cfg.page_size}")
    if req.bf16_model and cfg.dtype != "bfloat16":
        why.append(f"{kernel} needs --dtype bfloat16, got {cfg.dtype}")
    if req.indexer_fp8 and not cfg.indexer_fp8:
        why.append(f"{kernel} needs the FP8 indexer cache (--indexer-quant fp8)")
    if why and req.hint:
        why[-1] += f" ({req.hint})"
    return [f"{op}: {w}" for w in why]
