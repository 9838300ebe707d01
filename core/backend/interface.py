"""The backend contract: what a vendor package provides and how the core asks for it.

A backend package registers a *probe* under the entry-point group ``dsv.backends`` (the entry-point name is
the ``--device`` value). The probe must import without the vendor SDK and answer quickly; the heavy
:class:`Backend` class is imported only once the backend is chosen.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from dsv.ops.metadata import AttentionMetadata

#: Bumped whenever an operation's signature or semantics change. A backend built for another version is refused.
#: Optional additions with a default in :class:`Backend` (``decode_runner``) or :class:`Kernel` (``capturable``)
#: keep version 1: a backend written before them still works (eager decode, kernels assumed capturable).
BACKEND_API_VERSION = 1

#: Every operation of the contract, with its reference implementation in ``dsv.backend.reference``.
#: Signatures are those of the functions in ``dsv.ops`` named in ``REFERENCE_OPS`` there.
OPS: tuple[str, ...] = (
    "linear",  # fp8 block-scaled GEMM (1x128 activation groups, 128x128 weight blocks) or float GEMM
    "rms_norm",
    "indexer_topk_prefill",  # lightning indexer logits + top-k, ragged causal prefill
    "indexer_topk_decode",  # same over the paged key cache, one or a few query tokens per sequence
    "sparse_mla_prefill",  # absorbed sparse MLA over top-k global slots (--nsa-prefill)
    "sparse_mla_decode",  # same for decode (--nsa-decode)
    "mha_prefill",  # dense per-head causal prefill for sequences that fit in index_topk
    "kv_write",  # MLA latent cache write (float or FP8 656-byte layout)
    "index_k_write",  # indexer key write (fp8 + scale, or unquantized)
    "moe_route",  # sigmoid grouped top-k routing
    "fused_moe",  # routed experts (grouped GEMM + SwiGLU)
)

#: The operations a pure decode forward (one query token per sequence) calls: what a decode CUDA graph captures.
DECODE_OPS: tuple[str, ...] = (
    "linear",
    "rms_norm",
    "indexer_topk_decode",
    "sparse_mla_decode",
    "kv_write",
    "index_k_write",
    "moe_route",
    "fused_moe",
)

#: Operations chosen by the user by kernel name (``--nsa-prefill`` / ``--nsa-decode``).
SELECTABLE_OPS = {"nsa_prefill": "sparse_mla_prefill", "nsa_decode": "sparse_mla_decode"}


@dataclass(frozen=True)
class ProbeResult:
    """Answer of a backend's cheap probe.

    Attributes:
        name: the ``--device`` value.
        available: whether the backend can run on this machine.
        reason: why not (or a short description of the device found).
        score: preference when several backends are available (higher wins).
        backend_class: ``"module:Class"`` of the :class:`Backend`, imported only when chosen.
        api_version: the contract version the package was built for.
    """

    name: str
    available: bool
    reason: str
    score: int
    backend_class: str
    api_version: int = BACKEND_API_VERSION


@dataclass(frozen=True)
class Kernel:
    """A named implementation of one operation.

    ``available`` is False (with ``reason``) when the kernel exists in the package but cannot run here,
    e.g. a vendor library is not installed. ``capturable`` is False when the kernel synchronizes with the
    host (``.tolist()``, ``.item()``, ``nonzero``, data-dependent shapes), so a CUDA/HIP graph cannot capture it.
    """

    op: str
    name: str
    fn: Callable[..., Any] | None
    available: bool = True
    reason: str = ""
    description: str = ""
    capturable: bool = True


@dataclass
class Capabilities:
    """What a backend declares about itself."""

    device_type: str
    torch_device: str
    dist_backend: str
    fp8_dtype: torch.dtype | None
    kv_layouts: tuple[str, ...]  # "float" and/or "fp8"
    page_sizes: tuple[int, ...] | None  # None = any page size
    graph_capture: bool
    kernels: dict[str, list[Kernel]] = field(default_factory=dict)


@dataclass(frozen=True)
class DecodeGraphConfig:
    """What a backend needs to capture decode graphs (built by the engine once the KV pool exists).

    Attributes:
        max_batch_size: most sequences one captured decode step holds (larger steps run eagerly).
        max_seq_len: the longest context any sequence may reach; frozen into the graphs.
        page_size: KV page size of the pool.
        pad_slot: a KV slot no sequence ever owns; padding rows write there.
        batch_sizes: sizes to capture (None: the backend's default ladder up to ``max_batch_size``).
        context_buckets: frozen context lengths to capture below ``max_seq_len`` (None: the backend's
            default), so that short contexts do not pay for kernels sized by the maximum context.
        cache_config: ``validate()``-style keys (kv_cache_dtype, page_size, indexer_quant, dtype) for kernel
            requirements.
        kernel_choices: the user's explicit op -> kernel choices; a backend may replace a non-capturable
            default kernel for decode, never an explicit choice.
    """

    max_batch_size: int
    max_seq_len: int
    page_size: int
    pad_slot: int
    batch_sizes: tuple[int, ...] | None = None
    context_buckets: tuple[int, ...] | None = None
    cache_config: dict[str, Any] = field(default_factory=dict)
    kernel_choices: dict[str, str] = field(default_factory=dict)


#: ``forward(input_ids [T], meta, ops) -> hidden [T, D]``: the model forward over the engine's KV caches.
DecodeForward = Callable[[torch.Tensor, "AttentionMetadata", "OpTable"], torch.Tensor]


class DecodeRunner(Protocol):
    """A captured decode forward: ``runner(input_ids, meta)`` returns hidden states [num_seqs, D].

    The result may be a view of a static buffer that the next call overwrites: consume it first.
    """

    def __call__(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor: ...

    def describe(self) -> str:
        """One line for the start-up log (captured sizes, kernels replaced for capture)."""
        ...


class KernelUnavailable(RuntimeError):
    """A requested kernel cannot run: the message names what is missing and what would work."""


class Backend(ABC):
    """Base class of every backend. Subclasses set the class attributes and implement the methods."""

    name: str = ""
    api_version: int = BACKEND_API_VERSION

    @abstractmethod
    def capabilities(self) -> Capabilities:
        """Device facts and the named kernels per operation (available or not, with reasons)."""

    def validate(self, config: dict[str, Any]) -> list[str]:
        """Reasons why this backend cannot serve ``config`` (keys: kv_cache_dtype, page_size, dtype,
        nsa_prefill, nsa_decode, ...). An empty list means it can."""
        caps = self.capabilities()
        reasons: list[str] = []
        layout = {"fp8_e4m3": "fp8"}.get(config.get("kv_cache_dtype", "auto"), "float")
        if layout not in caps.kv_layouts:
            reasons.append(f"{self.name}: KV layout {layout!r} not supported (supported: {caps.kv_layouts})")
        page = config.get("page_size")
        if page is not None and caps.page_sizes is not None and page not in caps.page_sizes:
            reasons.append(f"{self.name}: page size {page} not supported (supported: {caps.page_sizes})")
        for flag, op in SELECTABLE_OPS.items():
            wanted = config.get(flag)
            if wanted:
                try:
                    self.kernel(op, wanted)
                except KernelUnavailable as exc:
                    reasons.append(str(exc))
        return reasons

    def kernel(self, op: str, name: str | None = None) -> Kernel:
        """The kernel ``name`` for ``op`` (or the first available one). Raises :class:`KernelUnavailable`."""
        if op not in OPS:
            raise KernelUnavailable(f"unknown operation {op!r}; operations are {', '.join(OPS)}")
        kernels = self.capabilities().kernels.get(op, [])
        usable = [k for k in kernels if k.available]
        if name is None:
            if not usable:
                raise KernelUnavailable(f"{self.name}: no available kernel for {op}")
            return usable[0]
        for k in kernels:
            if k.name == name:
                if not k.available:
                    alt = ", ".join(x.name for x in usable) or "none"
                    raise KernelUnavailable(
                        f"{self.name}: kernel {name!r} for {op} cannot run here: {k.reason}. Available: {alt}"
                    )
                return k
        known = ", ".join(f"{k.name}{'' if k.available else ' (unavailable)'}" for k in kernels) or "none"
        raise KernelUnavailable(f"{self.name}: no kernel named {name!r} for {op}; known: {known}")

    def ops(self, choices: dict[str, str] | None = None, config: dict[str, Any] | None = None) -> OpTable:
        """Resolve one callable per operation.

        Args:
            choices: op name (or ``nsa_prefill`` / ``nsa_decode``) -> kernel name; unnamed ops get the default.
            config: the cache configuration (``validate()``'s keys); a backend whose best kernel depends on it
                (e.g. the decode kernel on the KV dtype) uses it to choose defaults. The base ignores it.
        """
        wanted = {SELECTABLE_OPS.get(k, k): v for k, v in (choices or {}).items() if v}
        return OpTable({op: self.kernel(op, wanted.get(op)) for op in OPS})

    def decode_runner(
        self, forward: DecodeForward, ops: OpTable, config: DecodeGraphConfig
    ) -> DecodeRunner | None:
        """Capture ``forward`` for decode batches (CUDA/HIP graphs) and return the runner, or None when this
        backend has no graphs (the base: every step runs eagerly).

        Called once at engine start, after the KV pool is allocated. A backend that cannot capture with the
        chosen kernels raises :class:`KernelUnavailable` naming the kernel and ``--disable-cuda-graph``.
        """
        return None


class OpTable:
    """The resolved kernel for every operation, called as attributes: ``ops.sparse_mla_decode(...)``."""

    def __init__(self, kernels: dict[str, Kernel]) -> None:
        missing = [op for op in OPS if op not in kernels]
        if missing:
            raise KernelUnavailable(f"op table lacks {missing}")
        self.kernels = kernels
        for op, k in kernels.items():
            setattr(self, op, k.fn)

    def describe(self) -> dict[str, str]:
        return {op: k.name for op, k in self.kernels.items()}
