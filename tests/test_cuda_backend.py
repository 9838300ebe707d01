"""dsv-cuda without a GPU: the probe, the capabilities, validate() reasons, the default kernel choice with
and without the vendor libraries, and import hygiene (no vendor SDK imported by the package)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys

import pytest
import torch

from dsv.backend.interface import BACKEND_API_VERSION, OPS, Capabilities, Kernel, KernelUnavailable

dsv_cuda = pytest.importorskip("dsv_cuda", reason="install with: pip install -e backends/cuda --no-deps")

from dsv_cuda import kernels as kernels_mod  # noqa: E402
from dsv_cuda.backend import CudaBackend  # noqa: E402

VENDOR_MODULES = ("flash_mla", "sgl_kernel", "deep_gemm", "tilelang", "flash_attn_interface", "flash_attn")
H200 = (9, 0)


@pytest.fixture
def libraries(monkeypatch):
    """Pretend the named vendor modules are installed (find_spec finds them; nothing is imported)."""

    def install(*names: str) -> None:
        real = importlib.util.find_spec

        def find_spec(name, package=None):
            if name in names:
                return importlib.machinery.ModuleSpec(name, None)
            if name in VENDOR_MODULES:
                return None
            return real(name, package)

        for name in VENDOR_MODULES:
            monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    install()  # by default: none installed, even on a machine that has some
    return install


@pytest.fixture(autouse=True)
def _no_triton(monkeypatch):
    # The default-choice tests must not depend on whether dsv's Triton kernels exist yet.
    monkeypatch.setattr(kernels_mod, "triton_kernels", lambda: ({}, False, "triton not in this test"))


# ----- probe -----


def test_probe_without_cuda_says_why():
    result = dsv_cuda.probe()
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert result.name == "cuda" and not result.available and result.score == 0
    assert result.api_version == BACKEND_API_VERSION
    assert result.backend_class == "dsv_cuda.backend:CudaBackend"
    assert "torch built without CUDA" in result.reason or "no CUDA device visible" in result.reason


def test_probe_with_cuda_build_but_no_device(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    result = dsv_cuda.probe()
    assert not result.available and "no CUDA device visible" in result.reason


def test_probe_names_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))
    result = dsv_cuda.probe()
    assert (
        result.available and result.score > 0 and "NVIDIA H200" in result.reason and "sm_90" in result.reason
    )


def test_entry_point_is_registered():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="dsv.backends")}
    assert eps.get("cuda") == "dsv_cuda:probe"


# ----- capabilities -----


def test_capabilities_are_well_formed(libraries):
    caps = CudaBackend("cuda:1", arch=H200).capabilities()
    assert isinstance(caps, Capabilities)
    assert caps.device_type == "cuda" and caps.torch_device == "cuda:1" and caps.dist_backend == "nccl"
    assert caps.fp8_dtype == torch.float8_e4m3fn and caps.kv_layouts == ("float", "fp8")
    assert caps.page_sizes is None and caps.graph_capture is True
    assert set(caps.kernels) == set(OPS)
    for op, kernels in caps.kernels.items():
        names = [k.name for k in kernels]
        assert len(names) == len(set(names)), op
        assert all(isinstance(k, Kernel) and k.op == op for k in kernels)
        assert kernels[-1].name == "torch" and kernels[-1].available
        for k in kernels:
            assert k.available == (k.reason == ""), (op, k.name, k.reason)
    tile = {k.name: k for k in caps.kernels["sparse_mla_decode"]}["tilelang"]
    assert not tile.available and "tilelang is not installed" in tile.reason


def test_missing_libraries_are_listed_with_reasons(libraries):
    kernels = CudaBackend(arch=H200).capabilities().kernels
    decode = {k.name: k for k in kernels["sparse_mla_decode"]}
    assert list(decode)[:3] == ["fa3", "flashmla_decode", "tilelang"]
    assert not decode["fa3"].available and "FA3 is not installed" in decode["fa3"].reason
    assert "FlashMLA is not installed" in decode["flashmla_decode"].reason
    linear = {k.name: k for k in kernels["linear"]}
    assert "DeepGEMM is not installed" in linear["deep_gemm"].reason
    assert linear["scaled_mm"].available  # torch's own: needs only the (simulated) sm_90 GPU


def test_without_a_gpu_vendor_kernels_say_no_device(libraries):
    libraries("flash_mla", "deep_gemm", "sgl_kernel")
    kernels = CudaBackend(arch=None).capabilities().kernels
    for op in ("sparse_mla_decode", "linear", "fused_moe"):
        for k in kernels[op][:-1]:
            assert not k.available, (op, k.name)
    mla = {k.name: k for k in kernels["sparse_mla_decode"]}["flashmla_decode"]
    assert "needs an NVIDIA GPU" in mla.reason


def test_rejects_non_cuda_device():
    with pytest.raises(ValueError, match="cuda"):
        CudaBackend("cpu")


# ----- default kernels -----


def test_defaults_without_vendor_libraries(libraries):
    defaults = CudaBackend(arch=H200).default_kernels()
    assert defaults["sparse_mla_decode"] == "torch" and defaults["sparse_mla_prefill"] == "torch"
    assert defaults["linear"] == "scaled_mm" and defaults["fused_moe"] == "torch"


def test_defaults_follow_sglang_on_h200(libraries):
    libraries("flash_mla", "sgl_kernel", "deep_gemm")
    backend = CudaBackend(arch=H200)
    bf16 = backend.default_kernels("auto", page_size=64)
    assert bf16["sparse_mla_prefill"] == "flashmla_prefill" and bf16["sparse_mla_decode"] == "fa3"
    assert bf16["linear"] == "deep_gemm" and bf16["fused_moe"] == "deep_gemm"
    assert bf16["indexer_topk_prefill"] == "deep_gemm" and bf16["indexer_topk_decode"] == "deep_gemm"
    assert bf16["mha_prefill"] == "fa3"
    fp8 = backend.default_kernels("fp8_e4m3", page_size=64)
    assert fp8["sparse_mla_decode"] == "flashmla_decode" and fp8["sparse_mla_prefill"] == "flashmla_prefill"


def test_defaults_skip_kernels_the_config_rules_out(libraries):
    libraries("flash_mla", "sgl_kernel", "deep_gemm")
    backend = CudaBackend(arch=H200)
    fp8_page16 = backend.default_kernels("fp8_e4m3", page_size=16)
    assert fp8_page16["sparse_mla_decode"] == "torch"  # fa3: bf16 only; flashmla_decode: page 64 only
    assert fp8_page16["indexer_topk_decode"] == "torch" and fp8_page16["indexer_topk_prefill"] == "deep_gemm"
    assert backend.default_kernels("auto", indexer_quant="none")["indexer_topk_prefill"] == "torch"
    assert backend.default_kernels("auto", dtype="float32")["sparse_mla_decode"] == "torch"


def test_only_flashmla_installed_decodes_fp8_with_it(libraries):
    libraries("flash_mla")
    defaults = CudaBackend(arch=H200).default_kernels("fp8_e4m3", page_size=64)
    assert defaults["sparse_mla_decode"] == "flashmla_decode"
    assert CudaBackend(arch=H200).default_kernels("bf16")["sparse_mla_decode"] == "torch"


def test_ops_resolves_choices_and_logs_them(libraries, caplog):
    libraries("flash_mla", "sgl_kernel")
    backend = CudaBackend(arch=H200)
    with caplog.at_level("INFO", logger="dsv_cuda.backend"):
        table = backend.ops(
            {"nsa_decode": "flashmla_decode"}, {"kv_cache_dtype": "fp8_e4m3", "page_size": 64}
        )
    assert table.describe()["sparse_mla_decode"] == "flashmla_decode"
    assert "sparse_mla_decode=flashmla_decode" in caplog.text
    assert backend.ops().describe()["sparse_mla_decode"] == "fa3"
    with pytest.raises(KernelUnavailable, match="bf16 KV layout"):
        backend.ops({"nsa_decode": "fa3"}, {"kv_cache_dtype": "fp8_e4m3"})


# ----- validate -----


def test_validate_flashmla_decode_needs_page_64_and_fp8(libraries):
    libraries("flash_mla")
    backend = CudaBackend(arch=H200)
    reasons = backend.validate(
        {"nsa_decode": "flashmla_decode", "kv_cache_dtype": "fp8_e4m3", "page_size": 16}
    )
    assert len(reasons) == 1 and "--page-size 64" in reasons[0] and "got 16" in reasons[0]
    reasons = backend.validate({"nsa_decode": "flashmla_decode", "kv_cache_dtype": "bf16", "page_size": 64})
    assert len(reasons) == 1 and "FP8 KV layout" in reasons[0]
    assert (
        backend.validate({"nsa_decode": "flashmla_decode", "kv_cache_dtype": "fp8_e4m3", "page_size": 64})
        == []
    )


def test_validate_fa3_needs_the_bf16_cache(libraries):
    libraries("sgl_kernel")
    backend = CudaBackend(arch=H200)
    reasons = backend.validate({"nsa_decode": "fa3", "kv_cache_dtype": "fp8_e4m3"})
    assert len(reasons) == 1 and "bf16 KV layout" in reasons[0]
    assert backend.validate({"nsa_decode": "fa3", "nsa_prefill": "fa3", "kv_cache_dtype": "bf16"}) == []


def test_validate_refuses_missing_library_with_reason(libraries):
    reasons = CudaBackend(arch=H200).validate({"nsa_prefill": "flashmla_prefill"})
    assert (
        len(reasons) == 1 and "FlashMLA is not installed" in reasons[0] and "Available: torch" in reasons[0]
    )
    reasons = CudaBackend(arch=H200).validate({"nsa_decode": "tilelang"})
    assert "tilelang is not installed" in reasons[0]


# ----- import hygiene -----


def test_importing_dsv_cuda_imports_no_vendor_sdk():
    code = (
        "import sys, dsv_cuda\n"
        "dsv_cuda.probe()\n"
        "import dsv_cuda.backend, dsv_cuda.graphs\n"
        "dsv_cuda.backend.CudaBackend(arch=(9, 0)).capabilities()\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {VENDOR_MODULES!r}]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
