"""Server pieces without a live model: chat stream conversion (tool calls, reasoning) and the CLI."""

from __future__ import annotations

import asyncio

import pytest

from dsv.chat import (
    EOS,
    THINK_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_SEP,
)
from dsv.engine.outputs import CompletionOutput, RequestOutput
from dsv.server.cli import build_parser
from dsv.server.cmd_serve import build_server, unsupported
from dsv.server.routes_chat import chat_stream_chunks

CALL = (
    TOOL_CALLS_BEGIN
    + TOOL_CALL_BEGIN
    + "get_weather"
    + TOOL_SEP
    + '{"city": "Paris"}'
    + TOOL_CALL_END
    + TOOL_CALLS_END
    + EOS
)


async def _scripted(pieces: list[str]):
    """Engine deltas carrying ``pieces`` (one per step, cut anywhere), the last one finished."""
    for i, text in enumerate(pieces):
        last = i == len(pieces) - 1
        yield RequestOutput(
            "r", [0], [CompletionOutput(0, [i], text, finish_reason="stop" if last else None)], last
        )


def _run(text: str, cut: int, reasoning: bool) -> list[dict]:
    pieces = [text[i : i + cut] for i in range(0, len(text), cut)]

    async def go():
        gen = chat_stream_chunks(
            _scripted(pieces), starts_in_reasoning=reasoning, n=1, chunk_base={"id": "x"}
        )
        return [c async for c in gen]

    return asyncio.run(go())


@pytest.mark.parametrize("cut", [1, 3, 7, 1000])
def test_stream_tool_call_without_markup(cut):
    chunks = _run("thinking hard" + THINK_END + "Let me check." + CALL, cut, reasoning=True)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert reasoning == "thinking hard"
    assert content == "Let me check."
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(0, "get_weather")]
    assert calls[0]["function"]["arguments"] == '{"city": "Paris"}' and calls[0]["id"].startswith("call_")
    assert "｜" not in content + reasoning  # no marker leaked
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_plain_content_keeps_stop_reason():
    chunks = _run("just text", 2, reasoning=False)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "just text"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def _args(*flags: str):
    return build_parser().parse_args(["serve", *flags])


def test_cli_accepts_sglang_flags():
    args = _args(
        "--model-path", "m", "--port", "30001", "--nsa-prefill-backend", "flashmla_sparse",
        "--nsa-decode-backend", "fa3", "--trust-remote-code", "--kv-cache-dtype", "bf16",
        "--page-size", "64", "--mem-fraction-static", "0.8", "--max-running-requests", "8",
        "--chunked-prefill-size", "4096", "--disable-radix-cache", "--api-key", "k",
        "--served-model-name", "ds", "--log-level", "info",
    )  # fmt: skip
    assert (args.model, args.port, args.nsa_prefill, args.nsa_decode) == (
        "m",
        30001,
        "flashmla_sparse",
        "fa3",
    )
    assert build_parser().parse_args(["serve"]).port == 30000
    assert unsupported(args) == []


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--tp", "8"], "TP parallelism is not built yet"),
        (["--dp", "2"], "DP parallelism is not built yet"),
        (["--ep", "8"], "EP parallelism is not built yet"),
        (["--enable-dp-attention"], "DP attention is not built yet"),
        (["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3"], "speculative decoding"),
    ],
)
def test_cli_refuses_unbuilt_features(flags, needle):
    with pytest.raises(SystemExit, match=needle):
        build_server(_args(*flags))


def test_cli_unusable_device_says_what_was_probed():
    with pytest.raises(SystemExit) as exc:
        build_server(_args("--device", "rocm"))
    msg = str(exc.value)
    assert "rocm" in msg and "Probed" in msg and "cpu" in msg
