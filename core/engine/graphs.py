"""Decode graphs from the engine's side: the settings (``--disable-cuda-graph``, ``--cuda-graph-max-bs``,
``--cuda-graph-bs``) and the one call that asks the backend to capture the decode forward.

The core never imports a vendor package: capture is the backend's job (:meth:`Backend.decode_runner`; the
base returns None, i.e. eager decode, which is what the reference backend does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dsv.backend.interface import Backend, DecodeGraphConfig, DecodeRunner, OpTable
from dsv.engine.kv_pool import KVPool
from dsv.model.deepseek_v32 import DeepseekV32ForCausalLM

#: The page padding rows of a captured batch write their KV to. ``KVPool`` and ``BlockManager`` never hand
#: out page 0 (it also backs the unused block-table entries), so no sequence's keys can be overwritten.
PAD_PAGE = 0


@dataclass(frozen=True)
class GraphSettings:
    """The user's decode-graph flags.

    Attributes:
        disable: ``--disable-cuda-graph``: every step runs eagerly.
        max_batch_size: ``--cuda-graph-max-bs``: largest decode batch captured (default: max running).
        batch_sizes: ``--cuda-graph-bs``: exact sizes to capture (default: the backend's ladder).
    """

    disable: bool = False
    max_batch_size: int | None = None
    batch_sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"--cuda-graph-max-bs must be >= 1, got {self.max_batch_size}")
        if self.batch_sizes is not None and (not self.batch_sizes or min(self.batch_sizes) < 1):
            raise ValueError(f"--cuda-graph-bs sizes must be >= 1, got {list(self.batch_sizes)}")

    @classmethod
    def from_flags(
        cls, disable: bool, max_bs: int | None, batch_sizes: Sequence[int] | None
    ) -> GraphSettings:
        return cls(bool(disable), max_bs, tuple(int(b) for b in batch_sizes) if batch_sizes else None)


def build_decode_runner(
    backend: Backend | None,
    model: DeepseekV32ForCausalLM,
    pool: KVPool,
    ops: OpTable,
    settings: GraphSettings,
    *,
    max_batch_size: int,
    max_seq_len: int,
    cache_config: dict[str, Any],
    kernel_choices: dict[str, str] | None = None,
) -> DecodeRunner | None:
    """Capture the decode forward over ``pool`` (call once the pool is allocated); None means eager decode.

    Args:
        max_batch_size: most sequences a decode step can hold (max running requests, token budget).
        max_seq_len: the longest context a sequence can reach (frozen into the graphs).
        cache_config: ``validate()``-style keys, for the kernels' requirements.
        kernel_choices: the user's explicit kernel choices (never replaced for capture).
    """
    if backend is None or settings.disable:
        return None
    wanted = settings.max_batch_size or max_batch_size
    sizes = settings.batch_sizes
    config = DecodeGraphConfig(
        max_batch_size=min(wanted, max_batch_size),
        max_seq_len=max_seq_len,
        page_size=pool.page_size,
        pad_slot=PAD_PAGE * pool.page_size,
        batch_sizes=sizes,
        cache_config=dict(cache_config),
        kernel_choices=dict(kernel_choices or {}),
    )
    layers = pool.layers
    return backend.decode_runner(lambda ids, meta, table: model(ids, meta, layers, table), ops, config)
