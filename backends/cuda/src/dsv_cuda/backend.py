"""``CudaBackend``: NVIDIA GPUs through Triton kernels, vendor libraries (FlashMLA, FA3, DeepGEMM) when
installed, and the torch reference everywhere else."""

from __future__ import annotations

import logging
from typing import Any

import torch

from dsv.backend.interface import (
    OPS,
    SELECTABLE_OPS,
    Backend,
    Capabilities,
    DecodeForward,
    DecodeGraphConfig,
    DecodeRunner,
    Kernel,
    KernelUnavailable,
    OpTable,
)
from dsv_cuda.capture import decode_op_table, mark_capturable
from dsv_cuda.kernels import build_kernels
from dsv_cuda.libraries import device_arch
from dsv_cuda.requirements import OPT_IN, KernelConfig, unmet

log = logging.getLogger(__name__)


class CudaBackend(Backend):
    """``--device cuda[:N]``.

    Args:
        device: torch device string, ``cuda`` or ``cuda:N``.
        arch: compute capability to assume instead of asking the driver (tests simulate an H200 with
            ``(9, 0)``); None asks torch.
    """

    name = "cuda"

    def __init__(self, device: str = "cuda", arch: tuple[int, int] | None = None) -> None:
        if torch.device(device).type != "cuda":
            raise ValueError(f"the cuda backend runs on cuda[:N] devices, got {device!r}")
        self.device = device
        self.arch = arch if arch is not None else device_arch(device)
        self._caps: Capabilities | None = None

    def capabilities(self) -> Capabilities:
        # Built once: it looks up libraries (find_spec) and imports dsv's Triton kernels.
        if self._caps is None:
            self._caps = Capabilities(
                device_type="cuda",
                torch_device=self.device,
                dist_backend="nccl",
                fp8_dtype=torch.float8_e4m3fn,
                kv_layouts=("float", "fp8"),
                page_sizes=None,  # any; flashmla_decode and the deep_gemm paged indexer need 64 (see validate)
                graph_capture=True,
                kernels=mark_capturable(build_kernels(self.arch)),
            )
        return self._caps

    # ----- kernel choice -----

    def default_kernels(
        self,
        kv_cache_dtype: str = "auto",
        page_size: int | None = None,
        indexer_quant: str = "fp8",
        dtype: str | torch.dtype | None = None,
    ) -> dict[str, str]:
        """The kernel each operation uses by default for this cache configuration.

        The first available kernel (in preference order) whose requirements the configuration meets: on an
        H200 with sgl-kernel and FlashMLA that is SGLang's choice, fa3 decode for a bf16 cache and
        flashmla_decode for the FP8 one, flashmla_prefill for prefill.
        """
        cfg = KernelConfig.from_dict(
            {
                "kv_cache_dtype": kv_cache_dtype,
                "page_size": page_size,
                "indexer_quant": indexer_quant,
                "dtype": dtype,
            }
        )
        return {op: self._default_for(op, cfg).name for op in OPS}

    def kernel(self, op: str, name: str | None = None) -> Kernel:
        """The kernel ``name`` for ``op``; without a name, the default for a bf16 model and cache (what
        ``dsv backends`` marks), which skips opt-in kernels as :meth:`ops` does."""
        if name is None and op in OPS:
            return self._default_for(op, KernelConfig())
        return super().kernel(op, name)

    def _default_for(self, op: str, cfg: KernelConfig) -> Kernel:
        usable = [k for k in self.capabilities().kernels.get(op, []) if k.available]
        if not usable:
            raise KernelUnavailable(f"{self.name}: no available kernel for {op}")
        for k in usable:
            if (op, k.name) not in OPT_IN and not unmet(op, k.name, cfg):
                return k
        return usable[-1]  # the torch reference has no requirements; reached only with a custom table

    def ops(self, choices: dict[str, str] | None = None, config: dict[str, Any] | None = None) -> OpTable:
        """Resolve one kernel per operation: ``choices`` (op -> kernel name, or ``nsa_prefill`` /
        ``nsa_decode`` -> kernel name) over the defaults for ``config`` (validate-style keys). A chosen
        kernel that cannot run here, or cannot serve ``config``, is refused with the reason."""
        cfg = KernelConfig.from_dict(config)
        wanted = {SELECTABLE_OPS.get(k, k): v for k, v in (choices or {}).items() if v}
        kernels: dict[str, Kernel] = {}
        for op in OPS:
            if op in wanted:
                k = self.kernel(op, wanted[op])
                if config is not None and (why := unmet(op, k.name, cfg)):
                    raise KernelUnavailable(f"{self.name}: " + "; ".join(why))
            else:
                k = self._default_for(op, cfg)
            kernels[op] = k
        log.info(
            "cuda kernels (%s KV, %s, page %s): %s",
            cfg.layout,
            cfg.kv_dtype,
            cfg.page_size or "any",
            ", ".join(f"{op}={k.name}" for op, k in kernels.items()),
        )
        return OpTable(kernels)

    # ----- decode graphs -----

    def decode_runner(
        self, forward: DecodeForward, ops: OpTable, config: DecodeGraphConfig
    ) -> DecodeRunner | None:
        """Capture the decode forward as CUDA graphs (one per batch size) and return the runner.

        Decode is captured with ``ops`` except where a default kernel synchronizes with the host: that op
        gets the first capturable kernel serving the cache configuration (logged, and named in
        ``describe()``); a non-capturable kernel the user chose explicitly is refused, naming
        ``--disable-cuda-graph``. Prefill keeps ``ops``.
        """
        from dsv_cuda.graphs import capture_decode

        decode_ops, replaced = decode_op_table(
            ops, self.capabilities().kernels, config.cache_config, config.kernel_choices
        )
        note = ", ".join(f"{op} {old} -> {new} (capturable)" for op, (old, new) in replaced.items())
        return capture_decode(
            lambda ids, meta: forward(ids, meta, decode_ops), config, self.device, note=note
        )

    # ----- validation -----

    def validate(self, config: dict[str, Any]) -> list[str]:
        """Base checks (layout, page size, chosen kernels available here) plus each chosen NSA kernel's
        requirements, e.g. flashmla_decode with a page size other than 64 or with the bf16 cache."""
        reasons = super().validate(config)
        cfg = KernelConfig.from_dict(config)
        for flag, op in SELECTABLE_OPS.items():
            wanted = config.get(flag)
            if wanted:
                reasons += [f"{self.name}: {r}" for r in unmet(op, wanted, cfg)]
        # Other operations chosen by kernel name under their op key (e.g. {"fused_moe": "grouped_mm"}).
        for op in OPS:
            wanted = config.get(op)
            if wanted and op not in SELECTABLE_OPS.values():
                try:
                    self.kernel(op, wanted)
                except KernelUnavailable as exc:
                    reasons.append(str(exc))
                    continue
                reasons += [f"{self.name}: {r}" for r in unmet(op, wanted, cfg)]
        return reasons
