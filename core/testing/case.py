"""What one conformance case is: an operation, a human id, a seeded input builder and a check.

A case never knows which backend runs it. The runner builds its inputs twice from the same seed: once on the
backend's device in the case's dtypes, once on the CPU with every bf16/fp16 tensor widened to fp32 (the
reference side), calls the backend's kernel on the first and the reference op on the second, and hands both
outputs to the case's :class:`Check`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from dsv.engine.batch import SeqChunk, build_metadata
from dsv.ops.metadata import AttentionMetadata

#: The four tiers, in the order they run.
TIERS = ("contract", "ops", "layers", "model")


@dataclass(frozen=True)
class Verdict:
    """A check's answer. ``ratio`` is the worst observed error divided by the allowed one (<= 1 passes)."""

    ok: bool
    max_err: float | None = None
    mean_err: float | None = None
    ratio: float | None = None
    detail: str = ""


class Check(Protocol):
    """Compares a backend's output with the reference one.

    ``tolerance`` states the rule in one line and ``why`` justifies it from the dtypes involved; both go into
    the report next to every result.
    """

    tolerance: str
    why: str

    def expect(self, ref_out: Any, ref_inputs: dict[str, Any]) -> Any:
        """What :meth:`compare` needs from the reference run (computed once, shared by all backends)."""
        ...

    def compare(self, out: Any, expected: Any) -> Verdict: ...


@dataclass(frozen=True)
class Needs:
    """Declared capabilities a case depends on: a backend that lacks one reports the case as not supported."""

    kv_layout: str | None = None  # "float" or "fp8" MLA cache layout
    page_size: int | None = None


@dataclass(frozen=True)
class Case:
    """One conformance case.

    Attributes:
        tier: "ops", "layers" or "model".
        op: the contract operation (ops tier) or the layer / model name.
        id: short human id, unique within ``op`` (``decode/h128/fp8/page64/topk2048``).
        build: ``build(inputs)`` returns the call's inputs, made through the seeded :class:`Inputs`.
        call: ``call(impl, inputs)`` runs the case: ``impl`` is the kernel function (ops tier) or an
            :class:`~dsv.backend.interface.OpTable` (layers and model tiers); returns what ``check`` compares.
        check: the comparison and its tolerance.
        needs: capabilities the case depends on.
        quick: part of the reduced grid (``--quick``).
        seed: seed of the input builder.
        replay: the reference run replays the backend's discrete choices (top-k keys, experts) after checking
            them as ties (:mod:`dsv.testing.replay`), and gets the backend's output as ``inputs["backend_out"]``.
            Such a case's reference runs in the case's own dtypes (a whole bf16 layer with FP8 activations is
            the configuration under test; fp32 would be another model), everything else in fp32.
    """

    tier: str
    op: str
    id: str
    build: Callable[[Inputs], dict[str, Any]]
    call: Callable[[Any, dict[str, Any]], Any]
    check: Check
    needs: Needs = field(default_factory=Needs)
    quick: bool = False
    seed: int = 0
    replay: bool = False

    @property
    def key(self) -> str:
        return f"{self.tier}:{self.op}:{self.id}"


class Inputs:
    """Seeded input factory: the same values on the backend side and on the reference side.

    Random values are drawn on the CPU from one generator, rounded to the requested dtype, then placed on
    the backend's device (backend side) or kept on the CPU (reference side, ``reference=True``), widened to
    fp32 unless ``widen=False``, so the reference computes in fp32 from exactly the values the backend sees.
    FP8 and integer tensors are never widened.
    """

    def __init__(self, device: str, reference: bool, seed: int, widen: bool = True) -> None:
        self.widen = reference and widen
        self.device = "cpu" if reference else device
        self.gen = torch.Generator().manual_seed(seed)

    def dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype this side uses for a tensor declared as ``dtype``."""
        if self.widen and dtype in (torch.bfloat16, torch.float16):
            return torch.float32
        return dtype

    def randn(self, *shape: int, dtype: torch.dtype = torch.bfloat16, std: float = 1.0) -> torch.Tensor:
        x = (torch.randn(shape, generator=self.gen) * std).to(dtype)
        return x.to(self.dtype(dtype)).to(self.device)

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on this side (floats widened on the reference side)."""
        return x.to(self.dtype(x.dtype)).to(self.device)

    def randperm(self, n: int) -> torch.Tensor:
        """A CPU permutation (for choosing pages and keys); not placed."""
        return torch.randperm(n, generator=self.gen)

    def pages(self, lengths: Sequence[int], page_size: int) -> tuple[list[list[int]], int]:
        """Shuffled page lists for sequences of the given final lengths, and the page count a cache needs.

        Pages are handed out in a random order (page 0 is never used), so every sequence longer than a page
        crosses into a non-adjacent one.
        """
        need = [-(-n // page_size) for n in lengths]
        order = (self.randperm(sum(need)) + 1).tolist()
        out, at = [], 0
        for k in need:
            out.append(order[at : at + k])
            at += k
        return out, sum(need) + 1

    def batch(self, spans: Sequence[tuple[int, int]], page_size: int) -> tuple[AttentionMetadata, int]:
        """Metadata for sequences given as (cached prefix length, new tokens) over shuffled pages, and the
        number of pages a cache needs."""
        pages, num_pages = self.pages([start + n for start, n in spans], page_size)
        chunks = [SeqChunk(start, n, p) for (start, n), p in zip(spans, pages)]
        return build_metadata(chunks, page_size, self.device), num_pages
