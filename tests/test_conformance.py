"""The conformance suite itself: it passes for the reference and dummy backends, catches the dummy's planted
fault, reports "not supported" apart from failures, writes its reports, and runs as a pytest plugin too.

The dummy backend lives in tests/plugins/dsv_dummy_backend and must be installed for some of these tests:
``pip install -e tests/plugins/dsv_dummy_backend --no-deps`` (scripts/dev.sh test does it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from dsv.backend.interface import OPS
from dsv.backend.registry import discover
from dsv.server import cli, cmd_backends
from dsv.testing import runner
from dsv.testing.checks import Close, QuantizedClose, RouteSet, TopKSet
from dsv.testing.report import FAIL, NOT_SUPPORTED, PASS, report_paths

HAS_DUMMY = any(f.name == "dummy" for f in discover())
needs_dummy = pytest.mark.skipif(
    not HAS_DUMMY,
    reason="the dummy backend is not installed: pip install -e tests/plugins/dsv_dummy_backend --no-deps",
)
PLANTED = ["--kernels", "sparse_mla_decode=planted_fault", "--ops", "sparse_mla_decode"]


def _run(argv: list[str], env: dict[str, str]) -> int:
    # One thread: the cases are small, and two threads fighting other jobs for two cores run 5x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            return runner.main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, str]:
    """The whole suite (every tier, the full grid) for cpu and dummy, once for this module."""
    if not HAS_DUMMY:
        pytest.skip(
            "the dummy backend is not installed: pip install -e tests/plugins/dsv_dummy_backend --no-deps"
        )
    prefix = tmp_path_factory.mktemp("conformance") / "report"
    rc = _run(["--report", str(prefix), "--repeats", "0", "-q"], {"DSV_BACKENDS": "cpu,dummy"})
    json_path, md_path = report_paths(prefix)
    return rc, json.loads(json_path.read_text()), md_path.read_text()


def test_suite_passes_for_cpu_and_dummy(full_run) -> None:
    rc, report, _ = full_run
    failures = [r for r in report["results"] if r["outcome"] == FAIL]
    assert rc == 0, failures
    assert set(report["summary"]) == {"cpu", "dummy"}
    tiers = {(r["backend"], r["tier"]) for r in report["results"] if r["outcome"] == PASS}
    assert tiers == {(b, t) for b in ("cpu", "dummy") for t in ("contract", "ops", "layers", "model")}
    # The dummy's tie-breaking variants were tested on their own and accepted.
    ran = {
        (r["op"], r["kernel"]) for r in report["results"] if r["backend"] == "dummy" and r["outcome"] == PASS
    }
    assert {("indexer_topk_prefill", "reversed_ties"), ("moe_route", "reversed_ties")} <= ran


def test_not_supported_is_reported_apart_with_reasons(full_run) -> None:
    _, report, md = full_run
    unsupported = [r for r in report["results"] if r["outcome"] == NOT_SUPPORTED]
    assert unsupported and all(r["backend"] == "dummy" and r["reason"] for r in unsupported)
    reasons = {r["reason"] for r in unsupported}
    assert "KV layout 'fp8' not declared (kv_layouts=('float',))" in reasons
    assert any("DSV_DUMMY_PLANTED_FAULT" in r for r in reasons)  # an unavailable kernel, not a failure
    assert any(r["case"].startswith("fp8-kv") for r in unsupported if r["tier"] == "layers")
    assert report["summary"]["dummy"][NOT_SUPPORTED] == len(unsupported)
    assert f"## Not supported ({len(unsupported)})" in md


def test_report_is_well_formed(full_run) -> None:
    _, report, md = full_run
    assert {"environment", "args", "backends", "summary", "ops", "results"} <= set(report)
    for r in report["results"]:
        assert r["outcome"] in (PASS, NOT_SUPPORTED, FAIL)
        if r["outcome"] == PASS and r["tier"] in ("ops", "layers", "model"):
            assert r["max_err"] is not None and r["mean_err"] is not None and r["time_ms"] is not None
            assert 0 <= r["ratio"] <= 1 and r["tolerance"] and r["why"]
    rows = {(row["backend"], row["op"], row["kernel"]) for row in report["ops"]}
    assert ("cpu", "sparse_mla_decode", "torch") in rows and ("dummy", "moe_route", "reversed_ties") in rows
    for section in (
        "# dsv backend conformance report",
        "## Failures (0)",
        "## Per operation",
        "## Tolerances",
    ):
        assert section in md


@needs_dummy
def test_planted_fault_is_reported_as_failure(tmp_path: Path) -> None:
    argv = [
        "--device",
        "dummy",
        "--tiers",
        "ops",
        "--repeats",
        "0",
        "--report",
        str(tmp_path / "r"),
        *PLANTED,
    ]
    assert _run(argv, {"DSV_DUMMY_PLANTED_FAULT": "1"}) == 1
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert {r["kernel"] for r in results} == {"planted_fault"}
    failed = [r for r in results if r["outcome"] == FAIL]
    # Every case the dummy supports (bf16 caches) catches it; FP8 cases are not supported, not passed.
    assert failed and all(r["ratio"] > 1 for r in failed)
    assert all(r["outcome"] == NOT_SUPPORTED for r in results if "/fp8/" in r["case"])
    assert not [r for r in results if r["outcome"] == PASS]


@needs_dummy
def test_planted_fault_is_unavailable_unless_enabled() -> None:
    argv = ["--device", "dummy", "--tiers", "ops", "--repeats", "0", "-q", *PLANTED]
    assert _run(argv, {"DSV_DUMMY_PLANTED_FAULT": "0"}) == 0


@needs_dummy
def test_tie_variants_choose_other_keys_and_experts() -> None:
    """The dummy's reversed tie-breaking really picks different sets on the tie cases (which then pass), so
    the set comparison is exercised, not vacuously satisfied."""
    from dsv_dummy_backend.backend import indexer_topk_reversed, moe_route_reversed

    from dsv.backend.reference import REFERENCE_OPS
    from dsv.testing.case import Inputs
    from dsv.testing.cases import all_cases

    for case in [c for c in all_cases(["ops"]) if "ties" in c.id]:
        args = case.build(Inputs("cpu", True, case.seed))
        ref = case.call(REFERENCE_OPS[case.op], args)
        other = case.call(moe_route_reversed if case.op == "moe_route" else indexer_topk_reversed, args)
        ids, other_ids = (ref[1], other[1]) if case.op == "moe_route" else (ref, other)
        assert any(set(a.tolist()) != set(b.tolist()) for a, b in zip(ids, other_ids)), case.key
        assert case.check.compare(other, case.check.expect(ref, args)).ok, case.key


def test_unknown_names_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.main(["--device", "cpu", "--kernels", "sparse_mla_decode=nope", "--list"]) == 2
    assert "no kernel named 'nope' for sparse_mla_decode; known: torch" in capsys.readouterr().err
    assert runner.main(["--device", "no-such-backend", "--list"]) == 2
    assert runner.main(["--device", "cpu", "--tiers", "ops,speed", "--list"]) == 2


def test_quick_grid_covers_every_op_and_the_hard_cases(capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.main(["--device", "cpu", "--quick", "--list"]) == 0
    listed = capsys.readouterr().out
    ops = {line.split("/")[2].split("[")[0] for line in listed.splitlines() if "/ops/" in line}
    assert ops == set(OPS)
    assert runner.main(["--device", "cpu", "--list"]) == 0
    full = capsys.readouterr().out
    for hard in (
        "fewer-than-topk",
        "page1",
        "page64",
        "/fp8/",
        "/bf16/",
        "/h16/",
        "/h64/",
        "/h128/",
        "ragged",
        "chunk-on-prefix",
        "spec-verify-3-tokens",
        "exact-ties",
        "topk2048",
        "interleaved-padding",
        "no-valid-key-row",
        "mha_prefill",
        "decoder_layer_dense",
        "decoder_layer_moe",
        "mtp_layer",
        "tiny_checkpoint",
    ):
        assert hard in full, hard


def test_cli_registers_conformance() -> None:
    assert cli.COMMANDS.get("conformance", ("",))[0] == "dsv.testing.runner"


def test_dsv_conformance_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(cli.COMMANDS, "conformance", ("dsv.testing.runner", "run the conformance suite"))
    assert cli.main(["conformance", "--device", "cpu", "--tiers", "contract", "-q"]) == 0
    assert "cpu: 7 passed, 0 not supported, 0 failed" in capsys.readouterr().out


def test_unusable_device_is_not_a_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv.backend.interface import ProbeResult
    from dsv.backend.registry import FoundBackend
    from dsv.testing import suite

    probe = ProbeResult("npu", False, "torch_npu is not installed", 0, "dsv_ascend.backend:AscendBackend")
    monkeypatch.setattr(suite, "discover", lambda: [FoundBackend("npu", "dsv-ascend", probe)])
    assert runner.main(["--device", "npu", "--tiers", "ops,layers", "-q"]) == 2


@needs_dummy
def test_dsv_backends_lists_kernels_and_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["backends", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    dummy = rows["dummy"]
    assert dummy["available"] and dummy["distribution"] == "dsv-dummy-backend" and dummy["api_version"] == 1
    decode = {k["name"]: k for k in dummy["kernels"]["sparse_mla_decode"]}
    assert decode["torch"]["default"] and not decode["planted_fault"]["available"]
    assert "DSV_DUMMY_PLANTED_FAULT" in decode["planted_fault"]["reason"]
    assert cli.main(["backends"]) == 0
    text = capsys.readouterr().out
    assert "dsv-dummy-backend" in text and "planted_fault [unavailable: set DSV_DUMMY_PLANTED_FAULT=1" in text
    assert cli.main(["backends", "--require", "dummy"]) == 0
    assert cli.main(["backends", "--require", "no-such-backend"]) == 1
    assert "not installed" in capsys.readouterr().out


def test_backends_row_for_an_unusable_backend() -> None:
    from dsv.backend.interface import ProbeResult
    from dsv.backend.registry import FoundBackend

    probe = ProbeResult("npu", False, "torch_npu is not installed", 0, "dsv_ascend.backend:AscendBackend")
    row = cmd_backends.describe(FoundBackend("npu", "dsv-ascend", probe))
    assert not row["available"] and row["reason"] == "torch_npu is not installed" and row["kernels"] == {}


def _pytest(args: list[str], tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "--pyargs",
        "dsv.testing.conformance",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    return subprocess.run(
        cmd + args,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )


@pytest.mark.skipif(
    not any(ep.name == "dsv_conformance" for ep in entry_points(group="pytest11")),
    reason="the pytest11 entry point is not registered: reinstall dsv (pip install -e .)",
)
def test_pytest_front_end(tmp_path: Path) -> None:
    proc = _pytest(
        [
            "--device",
            "cpu",
            "--dsv-quick",
            "--dsv-tiers",
            "contract,ops",
            "--dsv-report",
            str(tmp_path / "r"),
        ],
        tmp_path,
        {},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["cpu"][FAIL] == 0
    if HAS_DUMMY:
        args = [
            "--device",
            "dummy",
            "--dsv-tiers",
            "ops",
            "--dsv-ops",
            "sparse_mla_decode",
            "--dsv-kernels",
            "sparse_mla_decode=planted_fault",
            "-rs",
        ]
        proc = _pytest(args, tmp_path, {"DSV_DUMMY_PLANTED_FAULT": "1"})
        assert proc.returncode == 1 and " failed" in proc.stdout
        assert "KV layout 'fp8' not declared" in proc.stdout  # skipped with the reason


# ----- the comparators on hand-made answers -----


TOPK = TopKSet(scores=None, rel=2.0**-8, why="")


def test_topk_accepts_other_keys_at_ties_and_any_order() -> None:
    scores = torch.tensor([[5.0, 3.0, 3.0, 1.0, float("-inf")]])
    ref = torch.tensor([[0, 1, -1]])
    assert TOPK.compare(torch.tensor([[2, 0, -1]]), (scores, ref)).ok
    assert TOPK.compare(
        torch.tensor([[-1, 2, 0]]), (scores, ref)
    ).ok  # padding anywhere, tie broken the other way


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ([[0, 3, -1]], "differ from the reference top-k"),  # not a tie: score 1 instead of 3
        ([[0, -1, -1]], "valid entries"),  # a dropped key
        ([[0, 0, -1]], "selected twice"),
        ([[0, 4, -1]], "not visible"),
        ([[0, 5, -1]], "out of range"),
    ],
)
def test_topk_rejects_wrong_answers(answer: list[list[int]], problem: str) -> None:
    scores = torch.tensor([[5.0, 3.0, 3.0, 1.0, float("-inf")]])
    v = TOPK.compare(torch.tensor(answer), (scores, torch.tensor([[0, 1, -1]])))
    assert not v.ok and problem in v.detail


def test_route_accepts_group_ties_and_rejects_a_wrong_expert() -> None:
    route = RouteSet(id_tol=1e-5, rtol=1e-5, atol=1e-6, why="")
    logits = torch.tensor([[2.0, 1.0, 2.0, 1.0, -3.0, -3.0]])  # groups {0,1} and {2,3} tie exactly
    args = {
        "logits": logits,
        "bias": None,
        "n_group": 3,
        "topk_group": 1,
        "renormalize": True,
        "scaling": 1.0,
    }
    from dsv.ops.moe import moe_route

    ref = moe_route(logits, None, 2, 3, 1, True, 1.0)
    expected = route.expect(ref, args)
    other = moe_route(logits[:, [2, 3, 0, 1, 4, 5]], None, 2, 3, 1, True, 1.0)
    tie = (other[0], torch.tensor([[2, 3, 0, 1, 4, 5]])[0][other[1]])
    assert route.compare(ref, expected).ok and route.compare(tie, expected).ok
    assert sorted(tie[1][0].tolist()) != sorted(ref[1][0].tolist())
    wrong = (ref[0], torch.tensor([[0, 2]]))  # best of each tied group: no single-group selection has both
    assert not route.compare(wrong, expected).ok


def test_close_and_quantized_close() -> None:
    ref = torch.tensor([1.0, -2.0, 0.5])
    check = Close(rtol=0.01, atol=0.0, why="")
    assert check.compare(ref * 1.005, check.expect(ref, {})).ok
    v = check.compare(ref * 1.02, check.expect(ref, {}))
    assert not v.ok and v.ratio == pytest.approx(2.0, rel=1e-3)
    assert not check.compare(ref[:2], check.expect(ref, {})).ok
    rows = torch.tensor([[1.0] * 128 + [0.25], [0.0] * 129])
    q = QuantizedClose(quant_cols=128, why="")
    exp = q.expect(rows, {})
    one_step = rows.clone()
    one_step[0, 5] = 1.125  # the next e4m3 value above 1.0
    assert q.compare(one_step, exp).ok
    two_steps = rows.clone()
    two_steps[0, 5] = 1.25
    assert not q.compare(two_steps, exp).ok
    rope = rows.clone()
    rope[0, 128] = 0.2501  # unquantized columns are exact
    assert not q.compare(rope, exp).ok
