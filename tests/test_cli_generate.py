"""`dsv generate` end to end on the embedded default model."""

from __future__ import annotations

import json

import pytest

from dsv.server.cli import main


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DSV_CACHE_DIR", str(tmp_path_factory.mktemp("dsv-cache")))
    yield
    mp.undo()


def _run(capsys, *argv: str) -> dict:
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_json_greedy_is_deterministic(capsys):
    a = _run(capsys, "--input-ids", "0,5,7", "--max-new-tokens", "6", "--ignore-eos")
    b = _run(capsys, "--input-ids", "0,5,7", "--max-new-tokens", "6", "--ignore-eos", "--page-size", "1")
    assert a["prompt_token_ids"] == [0, 5, 7]
    assert len(a["output_token_ids"]) == 6 and a["output_token_ids"] == b["output_token_ids"]
    assert isinstance(a["text"], str)


def test_generate_prompt_sparse_path_fp8_cache(capsys):
    # 40 prompt tokens > index_topk (32): the sparse path, with the FP8 656-byte-style cache layout.
    prompt = "one two three four five six seven eight nine ten " * 4
    out = _run(
        capsys,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "4",
        "--kv-cache-dtype",
        "fp8_e4m3",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "1",
        "--ignore-eos",
    )
    assert len(out["prompt_token_ids"]) > 32 and len(out["output_token_ids"]) == 4


def test_bad_input_ids(capsys):
    with pytest.raises(SystemExit, match="must lie in"):
        main(["generate", "--input-ids", "0,999999999", "--json"])
