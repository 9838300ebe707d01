"""Engine settings (the serving flags shared by ``dsv serve``, ``dsv bench`` and :class:`dsv.LLM`).

Flag names follow SGLang: ``--page-size``, ``--kv-cache-dtype``, ``--max-total-tokens``,
``--mem-fraction-static``, ``--chunked-prefill-size``, ``--max-running-requests``, ``--disable-radix-cache``,
``--disable-cuda-graph``, ``--cuda-graph-max-bs``, ``--cuda-graph-bs``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

import torch

from dsv.engine.graphs import GraphSettings
from dsv.ops.kv_cache import KV_DTYPES

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


@dataclass
class EngineConfig:
    """How the engine runs a model.

    Attributes:
        page_size: tokens per KV page (64 for FlashMLA; any value >= 1 on the reference backend).
        kv_cache_dtype: "auto" (model dtype), "bf16", or "fp8_e4m3" (FlashMLA's 656-byte rows).
        indexer_quant: "fp8" (e4m3 keys + fp32 scale, 132 B/token at full size) or "none".
        max_total_tokens: KV capacity in tokens; when None it is derived from ``mem_fraction_static``.
        mem_fraction_static: fraction of the free device memory (after the weights) given to the KV cache.
            Default 0.9 on accelerators and 0.2 of the available RAM on the CPU.
        chunked_prefill_size: token budget of one forward (decode tokens and prefill chunks together).
        max_running_requests: most sequences in one forward.
        enable_prefix_caching: reuse full KV pages of earlier prompts (``--disable-radix-cache`` turns it off).
        enable_mtp: also allocate the MTP layer's caches (for speculative decoding).
        seed: seed of the sampler's generator for requests without their own seed.
        nsa_prefill / nsa_decode: kernel names for sparse MLA (``None``: the backend's first choice).
        max_model_len: longest prompt + output (default: the model's max_position_embeddings and the KV capacity).
        log_stats: print the KV cache summary (and the captured decode graphs) at start.
        disable_cuda_graph: decode eagerly (backends with graphs, e.g. cuda, capture pure decode steps).
        cuda_graph_max_bs: largest decode batch captured (default: max_running_requests).
        cuda_graph_bs: exact decode batch sizes to capture (default: the backend's ladder up to the max).
        enable_torch_compile: run pure decode steps through ``torch.compile`` (backends without decode graphs,
            i.e. the CPU; see :mod:`dsv.engine.compiled_decode`).
    """

    page_size: int = 64
    kv_cache_dtype: str = "auto"
    indexer_quant: str = "fp8"
    max_total_tokens: int | None = None
    mem_fraction_static: float | None = None
    chunked_prefill_size: int = 8192
    max_running_requests: int = 256
    enable_prefix_caching: bool = True
    enable_mtp: bool = False
    seed: int = 0
    nsa_prefill: str | None = None
    nsa_decode: str | None = None
    max_model_len: int | None = None
    log_stats: bool = True
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int | None = None
    cuda_graph_bs: list[int] | None = None
    enable_torch_compile: bool = False

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"--page-size must be >= 1, got {self.page_size}")
        if self.kv_cache_dtype not in KV_DTYPES:
            raise ValueError(f"--kv-cache-dtype must be one of {KV_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.chunked_prefill_size < 1:
            raise ValueError(f"--chunked-prefill-size must be >= 1, got {self.chunked_prefill_size}")
        if self.max_running_requests < 1:
            raise ValueError(f"--max-running-requests must be >= 1, got {self.max_running_requests}")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ValueError(f"--max-total-tokens must hold at least one page ({self.page_size} tokens)")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static <= 1:
            raise ValueError(f"--mem-fraction-static must be in (0, 1], got {self.mem_fraction_static}")
        self.graph_settings()  # validates the graph flags

    def graph_settings(self) -> GraphSettings:
        """The decode-graph flags."""
        return GraphSettings.from_flags(self.disable_cuda_graph, self.cuda_graph_max_bs, self.cuda_graph_bs)

    def kernel_choices(self) -> dict[str, str]:
        """``--nsa-*`` choices as the backend's op -> kernel map."""
        choices = {}
        if self.nsa_prefill:
            choices["sparse_mla_prefill"] = self.nsa_prefill
        if self.nsa_decode:
            choices["sparse_mla_decode"] = self.nsa_decode
        return choices


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The engine flags, for every command that runs the engine."""
    d = EngineConfig()
    p.add_argument("--page-size", type=int, default=d.page_size, help="tokens per KV page (default 64)")
    p.add_argument("--kv-cache-dtype", choices=list(KV_DTYPES), default=d.kv_cache_dtype)
    p.add_argument("--indexer-quant", choices=["fp8", "none"], default=d.indexer_quant)
    p.add_argument("--max-total-tokens", type=int, default=None, help="KV cache capacity in tokens")
    p.add_argument(
        "--mem-fraction-static", type=float, default=None, help="share of free memory for the KV cache"
    )
    p.add_argument(
        "--chunked-prefill-size", type=int, default=d.chunked_prefill_size, help="token budget per forward"
    )
    p.add_argument("--max-running-requests", type=int, default=d.max_running_requests)
    p.add_argument("--disable-radix-cache", action="store_true", help="turn off prefix caching")
    p.add_argument("--enable-mtp", action="store_true", help="allocate the MTP layer's KV caches")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output")
    p.add_argument("--nsa-prefill", default=None, help="sparse MLA prefill kernel name")
    p.add_argument("--nsa-decode", default=None, help="sparse MLA decode kernel name")
    p.add_argument("--seed", type=int, default=0, help="sampler seed for requests without one")
    p.add_argument(
        "--enable-torch-compile",
        action="store_true",
        help="compile the decode forward with torch.compile (cpu; the first decode step compiles)",
    )
    add_graph_arguments(p)


def add_graph_arguments(p: argparse.ArgumentParser) -> None:
    """The decode-graph flags (SGLang's spellings); ignored by backends without graphs (cpu)."""
    p.add_argument("--disable-cuda-graph", action="store_true", help="run decode steps eagerly")
    p.add_argument(
        "--cuda-graph-max-bs",
        type=int,
        default=None,
        help="largest decode batch to capture (default: max running)",
    )
    p.add_argument(
        "--cuda-graph-bs", type=int, nargs="+", default=None, help="explicit decode batch sizes to capture"
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Build an :class:`EngineConfig` from parsed :func:`add_engine_arguments` flags."""
    names = {f.name for f in fields(EngineConfig)}
    kwargs = {k: v for k, v in vars(args).items() if k in names}
    kwargs["enable_prefix_caching"] = not getattr(args, "disable_radix_cache", False)
    return EngineConfig(**kwargs)


def resolve_dtype(dtype: str | torch.dtype | None, model_dtype: str) -> torch.dtype:
    """``"auto"``/None -> the checkpoint's dtype (float weights; FP8 checkpoints compute in bf16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = model_dtype if dtype in (None, "auto") else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {name!r}")
    return DTYPES[name]


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (the available RAM for the CPU)."""
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    free, _ = torch.accelerator.get_memory_info(device)
    return int(free)
