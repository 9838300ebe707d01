"""``dsv bench serving`` end to end against a small fake OpenAI-compatible server on the loopback.

The fake (also used by tests/test_evals.py) streams ``max_tokens`` one-token chunks for /v1/completions and
answers /v1/chat/completions from a scripted responder, so every token count the benchmark reports is known.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from fastapi.responses import StreamingResponse  # noqa: E402

from dsv.server import bench_serving as bs  # noqa: E402

Responder = Callable[[list[dict[str, Any]], dict[str, Any]], str]


class FakeOpenAIServer:
    """FastAPI + uvicorn in a thread on 127.0.0.1, on a port the OS picks; records every request body."""

    def __init__(self, responder: Responder | None = None, token_delay: float = 0.002) -> None:
        self.responder = responder or (lambda messages, body: "ok")
        self.token_delay = token_delay
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _app(self) -> Any:
        app = fastapi.FastAPI()

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {
                "object": "list",
                "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "t"}],
            }

        @app.post("/v1/completions")
        async def completions(request: fastapi.Request) -> Any:
            body = await request.json()
            self.bodies.append(body)
            prompt = body["prompt"]
            n_in = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
            n_out = int(body.get("max_tokens") or 16)
            usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
            base = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"]}
            if not body.get("stream"):
                choice = {"index": 0, "text": " tok" * n_out, "logprobs": None, "finish_reason": "length"}
                return {**base, "choices": [choice], "usage": usage}

            async def events() -> Any:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    for i in range(n_out):
                        await asyncio.sleep(self.token_delay)
                        finish = "length" if i == n_out - 1 else None
                        choice = {"index": 0, "text": f" t{i}", "logprobs": None, "finish_reason": finish}
                        yield f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"
                    if (body.get("stream_options") or {}).get("include_usage"):
                        yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    self.in_flight -= 1

            return StreamingResponse(events(), media_type="text/event-stream")

        @app.post("/v1/chat/completions")
        async def chat(request: fastapi.Request) -> dict[str, Any]:
            body = await request.json()
            self.bodies.append(body)
            text = self.responder(body["messages"], body)
            n_out = len(text.split())
            return {
                "id": "chat-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": n_out, "total_tokens": 1 + n_out},
            }

        return app

    def __enter__(self) -> FakeOpenAIServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))  # port 0: the OS picks a free one, no race with other tests
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        assert self._thread is not None
        self._thread.join(timeout=10)


@pytest.fixture
def fake_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as server:
        yield server


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bs.add_serving_arguments(p)
    return p.parse_args(argv)


def test_random_dataset_end_to_end(fake_server: FakeOpenAIServer, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = parse(
        [
            "--base-url", fake_server.base_url,
            "--num-prompts", "8",
            "--random-input-len", "16",
            "--random-output-len", "5",
            "--random-vocab-size", "2000",
            "--output-file", str(out),
            "--output-details",
            "--disable-tqdm",
        ]
    )  # fmt: skip
    assert bs.run_serving(args) == 0
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert m["completed"] == 8 and m["failed"] == 0
    assert m["total_input_tokens"] == 8 * 16
    assert m["total_output_tokens"] == 8 * 5
    assert m["mean_ttft_ms"] > 0 and m["p99_itl_ms"] >= m["median_itl_ms"] > 0
    assert m["mean_tpot_ms"] > 0 and m["output_throughput"] > 0
    assert m["request_throughput"] == pytest.approx(8 / m["duration_s"])
    assert result["config"]["model"] == "fake-model"
    assert result["config"]["request_rate"] == "inf"
    assert all(len(r["itl"]) == 4 for r in result["requests"])  # 5 chunks -> 4 gaps
    # One warm-up request plus the 8 timed ones, all token-id prompts of exact length with EOS ignored.
    assert len(fake_server.bodies) == 9
    for body in fake_server.bodies:
        assert body["stream"] is True and body["ignore_eos"] is True
        assert len(body["prompt"]) == 16 and all(100 <= t < 1000 for t in body["prompt"])


def test_poisson_rate_and_concurrency_cap(fake_server: FakeOpenAIServer, tmp_path: Path) -> None:
    fake_server.token_delay = 0.005
    args = parse(
        [
            "--base-url", fake_server.base_url + "/v1",
            "--num-prompts", "6",
            "--random-input-len", "4",
            "--random-output-len", "4",
            "--random-vocab-size", "2000",
            "--request-rate", "200",
            "--max-concurrency", "2",
            "--warmup-requests", "0",
            "--disable-ignore-eos",
            "--output-file", str(tmp_path / "b.json"),
            "--disable-tqdm",
        ]
    )  # fmt: skip
    assert bs.run_serving(args) == 0
    assert fake_server.max_in_flight <= 2
    assert all(b["ignore_eos"] is False for b in fake_server.bodies)
    assert json.loads((tmp_path / "b.json").read_text())["config"]["request_rate"] == 200


def test_sharegpt_dataset(fake_server: FakeOpenAIServer, tmp_path: Path) -> None:
    data = [
        {
            "conversations": [
                {"from": "human", "value": f"Tell me fact {i} about the sea."},
                {"from": "gpt", "value": "x"},
            ]
        }
        for i in range(5)
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "bench.json"
    args = parse(
        [
            "--base-url", fake_server.base_url,
            "--dataset-name", "sharegpt",
            "--dataset-path", str(path),
            "--sharegpt-output-len", "3",
            "--num-prompts", "4",
            "--output-file", str(out),
            "--disable-tqdm",
        ]
    )  # fmt: skip
    assert bs.run_serving(args) == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["completed"] == 4 and m["total_output_tokens"] == 12
    assert all(isinstance(b["prompt"], str) and "about the sea" in b["prompt"] for b in fake_server.bodies)


def test_failed_server_reports_failures(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = parse(
        [
            "--base-url", f"http://127.0.0.1:{port}",
            "--model", "m",
            "--num-prompts", "2",
            "--random-vocab-size", "2000",
            "--random-input-len", "4",
            "--warmup-requests", "0",
            "--timeout", "5",
            "--disable-tqdm",
        ]
    )  # fmt: skip
    assert bs.run_serving(args) == 1


def test_arrival_delays_are_seeded() -> None:
    assert bs.arrival_delays(3, math.inf, 0) == [0.0, 0.0, 0.0]
    a = bs.arrival_delays(200, 10.0, seed=7)
    assert a == bs.arrival_delays(200, 10.0, seed=7) != bs.arrival_delays(200, 10.0, seed=8)
    assert 0.07 < sum(a) / len(a) < 0.13  # mean gap ~ 1 / rate


def test_compute_metrics_known_values() -> None:
    results = [
        bs.RequestResult(prompt_len=10, output_len=3, success=True, ttft=0.1, latency=0.3, itl=[0.1, 0.1]),
        bs.RequestResult(prompt_len=20, output_len=5, success=True, ttft=0.2, latency=0.6, itl=[0.1] * 4),
        bs.RequestResult(prompt_len=7, error="boom"),
    ]
    m = bs.compute_metrics(results, duration=2.0)
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 8
    assert m["output_throughput"] == pytest.approx(4.0)
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    assert m["mean_tpot_ms"] == pytest.approx(100.0)
    assert m["median_itl_ms"] == pytest.approx(100.0)


def test_random_requests_lengths() -> None:
    reqs = bs.random_requests(50, 100, 20, 0.5, vocab_size=5000, seed=3)
    assert all(50 <= r.prompt_len <= 100 and 10 <= r.output_len <= 20 for r in reqs)
    assert all(len(r.prompt) == r.prompt_len for r in reqs)
    assert [r.prompt for r in reqs] == [r.prompt for r in bs.random_requests(50, 100, 20, 0.5, 5000, 3)]


def test_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    results = [bs.RequestResult(prompt_len=1, output_len=2, success=True, ttft=0.1, latency=0.2, itl=[0.1])]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert bs.save_plot(results, tmp_path / "a.png") is False
    assert "pip install 'dsv[plot]'" in capsys.readouterr().err
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert bs.save_plot(results, tmp_path / "b.png") is True
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
