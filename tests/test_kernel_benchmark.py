"""benchmarks/kernels.py at tiny shapes under the Triton interpreter, and benchmarks/plot_kernels.py on its JSON.

The benchmark runs in a subprocess: ``TRITON_INTERPRET=1`` must be set before triton is first imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "kernels.py"
PLOT = ROOT / "benchmarks" / "plot_kernels.py"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_json(tmp_path_factory) -> dict:
    pytest.importorskip("triton", reason="triton is not installed")
    pytest.importorskip("dsv_cuda", reason="install with: pip install -e backends/cuda --no-deps")
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # --arch 9.0: the kernel table of an H200, so the library kernels are listed (and fail or run on the CPU).
    cmd = [
        sys.executable,
        str(BENCH),
        "--smoke",
        "--arch",
        "9.0",
        "--only",
        "fp8_gemm,T3,T5",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_smoke_run_times_and_checks_every_available_kernel(smoke_json):
    rows = {(r["family"], r["case"]): r for r in smoke_json["rows"]}
    assert set(rows) == {("fp8_gemm M16", "256x256"), ("fused_moe", "T3"), ("fused_moe", "T5")}
    assert smoke_json["kernels"]["fused_moe"]["scaled_grouped_mm"]["available"]  # simulated sm_90
    moe = rows[("fused_moe", "T3")]["results"]
    assert moe["torch"]["ms"] > 0 and "error" not in moe["torch"]  # the reference is the error basis
    assert moe["triton"]["error"] < 1e-2 and moe["triton"]["error_vs"] == "torch"
    assert moe["grouped_mm"]["error"] < 5e-2
    # CUDA-only ops fail on the CPU: recorded as a string, the run goes on.
    assert "_scaled_grouped_mm" in moe["scaled_grouped_mm"]["failed"]
    assert "scaled_mm" in rows[("fp8_gemm M16", "256x256")]["results"]
    assert (
        moe["grouped_mm.gemms"]["ms"] > 0 and "error" not in moe["grouped_mm.gemms"]
    )  # GEMMs alone: timed only
    assert "failed" in moe["scaled_grouped_mm.gemms"]
    skipped = rows[("fused_moe", "T5")]
    assert "torch" in skipped["skipped"] and skipped["results"]["grouped_mm"]["error_vs"] == "triton"
    gemm = rows[("fp8_gemm M16", "256x256")]
    assert (
        gemm["results"]["cublas_bf16"]["ms"] > 0
        and gemm["roofline_ms"] > 0
        and gemm["flops"] == 2 * 16 * 256**2
    )


def test_plots_from_the_smoke_json(smoke_json, tmp_path: Path):
    pytest.importorskip("matplotlib")
    plot = _load(PLOT)
    src = tmp_path / "smoke.json"
    src.write_text(json.dumps(smoke_json))
    assert plot.main([str(src), "--out-dir", str(tmp_path / "png")]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["fp8_gemm_M16.png", "fused_moe.png"]


def test_plots_from_a_fake_json(tmp_path: Path):
    pytest.importorskip("matplotlib")
    plot = _load(PLOT)

    def row(family, x, ms, flops=1e12):
        res = {"a": {"ms": ms, "tflops": flops / ms / 1e9, "gbps": 1.0}, "b": {"failed": "boom"}}
        return {"family": family, "case": str(x), "x": x, "flops": flops, "peak_flops": 1979e12,
                "roofline_ms": 0.5, "results": res}  # fmt: skip

    doc = {
        "peaks": {"hbm_bps": 4.8e12},
        "rows": [row("moe", 64, 2.0), row("moe", 512, 3.0), row("gemm M1", "q_a", 0.1), row("kv", 4, 1.0, 0)]
        + [{"family": "late", "case": "x", "x": 1, "failed": "not run: time budget"}],
    }
    src = tmp_path / "fake.json"
    src.write_text(json.dumps(doc))
    assert plot.series(doc["rows"][:2], "us") == {"a": [(0, 2000.0), (1, 3000.0)]}
    assert plot.main([str(src), "--out-dir", str(tmp_path / "png")]) == 0
    names = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert names == ["gemm_M1.png", "kv.png", "moe.png"]  # "late" never ran: no plot
    assert all((tmp_path / "png" / n).stat().st_size > 1000 for n in names)
