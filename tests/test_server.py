"""``dsv serve`` end to end: the official ``openai`` client against a live server on 127.0.0.1.

One module-scoped server runs the embedded default model on the CPU with a small KV budget; generation
lengths stay tiny so the module is fast on two cores.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx  # the HTTP client the openai package ships with
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dsv.engine.config import EngineConfig
from dsv.engine.llm_engine import LLMEngine
from dsv.server.app import create_app
from dsv.server.engine_client import AsyncEngine

API_KEY = "sk-test"
MAX_LEN = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    mp = pytest.MonkeyPatch()
    mp.setenv("DSV_CACHE_DIR", str(tmp_path_factory.mktemp("dsv-cache")))
    config = EngineConfig(max_total_tokens=1024, max_model_len=MAX_LEN, page_size=16, log_stats=False)
    engine = LLMEngine.from_pretrained(None, "cpu", "bfloat16", config)
    client = AsyncEngine(engine, max_pending=64)
    app = create_app(client, engine.tokenizer, "dsv-test", API_KEY, max_body_bytes=64 * 1024)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started
    yield base, client, os.environ["DSV_CACHE_DIR"]
    srv.should_exit = True
    thread.join(10)
    mp.undo()
    assert client.engine.stats().kv_pages_used == 0


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0)


def _http(server) -> httpx.Client:
    return httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)


def _pages_back(client: AsyncEngine, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = client.stats()
        if s.kv_pages_used == 0 and s.num_running == 0 and s.num_waiting == 0:
            return True
        time.sleep(0.02)
    return False


# ----- OpenAI endpoints -----
def test_models(oai):
    assert [m.id for m in oai.models.list().data] == ["dsv-test"]


def test_completion_n_logprobs_echo_seed(oai):
    kw = dict(model="dsv-test", prompt="Hello", max_tokens=3, n=2, temperature=1.0, seed=7, logprobs=2)
    out = oai.completions.create(**kw)
    assert [c.index for c in out.choices] == [0, 1]
    for c in out.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == 3
        assert all(len(t) >= 2 for t in c.logprobs.top_logprobs)
    assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens >= 1
    again = oai.completions.create(**kw)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeded
    echo = oai.completions.create(model="dsv-test", prompt="Hello", max_tokens=2, echo=True, temperature=0)
    assert echo.choices[0].text.startswith("Hello")


def test_completion_stop_and_batch(oai):
    out = oai.completions.create(
        model="dsv-test", prompt=["a", "b"], max_tokens=2, temperature=0, stop=["\n"]
    )
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in out.choices)


def test_completion_stream_usage(oai):
    chunks = list(
        oai.completions.create(
            model="dsv-test",
            prompt=[1, 2, 3],
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason == "length"


@pytest.mark.parametrize("thinking", [False, True])
def test_chat(oai, thinking):
    out = oai.chat.completions.create(
        model="dsv-test",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        extra_body={"chat_template_kwargs": {"thinking": thinking}},
    )
    msg = out.choices[0].message
    extra = getattr(msg, "model_extra", None) or {}
    if thinking:
        assert isinstance(extra.get("reasoning_content"), str)
    else:
        assert extra.get("reasoning_content") is None
    assert len(out.choices[0].logprobs.content) == 3
    assert out.usage.completion_tokens == 3


def test_chat_stream_thinking(oai):
    stream = oai.chat.completions.create(
        model="dsv-test",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"chat_template_kwargs": {"thinking": True}},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
    )
    assert reasoning  # the random model rarely closes </think>: its text is reasoning
    assert chunks[-1].usage.completion_tokens == 4


def test_concurrent_streams(oai, server):
    def one(i: int) -> int:
        s = oai.completions.create(
            model="dsv-test", prompt=f"p{i}", max_tokens=4, stream=True, extra_body={"ignore_eos": True}
        )
        return sum(1 for c in s if c.choices and c.choices[0].text is not None)

    with ThreadPoolExecutor(6) as pool:
        counts = list(pool.map(one, range(6)))
    assert all(c >= 1 for c in counts)
    assert _pages_back(server[1])


def test_disconnect_aborts_and_frees_pages(server):
    client = server[1]
    assert _pages_back(client)
    with _http(server) as http:
        body = {"prompt": "x" * 50, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for line in lines:
                if line.startswith("data:"):
                    break
            assert client.stats().kv_pages_used > 0
    assert _pages_back(
        client, timeout=3.0
    )  # well before 400 tokens: the server saw the disconnect and aborted the request


def test_non_streaming_disconnect_aborts_and_frees_pages(server):
    client = server[1]
    assert _pages_back(client)
    body = {"prompt": "x" * 50, "max_tokens": 400, "ignore_eos": True}
    with _http(server) as http, pytest.raises(httpx.TimeoutException):
        # The client gives up long before 400 tokens can be generated on the CPU.
        http.post("/v1/completions", json=body, timeout=1.0)
    assert _pages_back(client, timeout=3.0)


# ----- native endpoints -----
def test_generate_native(server):
    with _http(server) as http:
        r = http.post("/generate", json={"input_ids": [0, 5, 7], "sampling_params": {"max_new_tokens": 2}})
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 2
        assert r.json()["meta_info"]["finish_reason"]["type"] == "length"
        r = http.post(
            "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}, "stream": True}
        )
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) >= 3


def test_info_health_flush_openapi(server):
    with _http(server) as http:
        assert http.get("/health_generate").status_code == 200
        assert http.get("/get_model_info").json()["is_generation"] is True
        assert "internal_states" in http.get("/get_server_info").json()
        assert http.post("/flush_cache").status_code == 200
        assert "/v1/chat/completions" in http.get("/openapi.json").json()["paths"]


def test_metrics(server, oai):
    oai.completions.create(model="dsv-test", prompt="m", max_tokens=2)
    with _http(server) as http:
        text = http.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "dsv:requests",
        "dsv:generation_tokens",
        "dsv:time_to_first_token_seconds",
        "dsv:inter_token_latency_seconds",
        "dsv:num_running_reqs",
        "dsv:num_queue_reqs",
        "dsv:kv_cache_usage_ratio",
        "dsv:prefix_cache_hit_rate",
    ):
        assert name in fams, name
    assert sum(s.value for s in fams["dsv:requests"].samples if s.name.endswith("_total")) > 0


# ----- errors -----
def _err(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_auth(server):
    with httpx.Client(base_url=server[0]) as http:
        assert http.get("/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/get_model_info"):
            _err(http.get(path), 401)
        _err(http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)


def test_bad_requests(server, oai):
    with _http(server) as http:
        _err(http.get("/nope"), 404)
        _err(http.post("/v1/completions", json={"model": "other", "prompt": "x"}), 404)
        _err(http.post("/v1/completions", json={"prompt": "x", "temperature": "hot"}), 422)
        _err(http.post("/v1/chat/completions", json={"messages": []}), 422)
        _err(http.post("/v1/chat/completions", json={"messages": [{"role": "bot", "content": "x"}]}), 400)
        err = _err(http.post("/v1/completions", json={"prompt": [5] * (MAX_LEN + 10)}), 400)
        assert str(MAX_LEN + 10) in err["message"] and str(MAX_LEN) in err["message"]
        _err(http.post("/v1/completions", json={"prompt": "x" * 70_000}), 413)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="dsv-test", prompt=[10**7], max_tokens=2)


def test_overload_and_unavailable(server):
    client = server[1]
    with _http(server) as http:
        client.max_pending = 0
        try:
            _err(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}), 429)
        finally:
            client.max_pending = 64
        client.draining = True
        try:
            _err(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}), 503)
            assert http.get("/health").status_code == 503
        finally:
            client.draining = False
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_sigterm_drains_and_exits_zero(server):
    port = _free_port()
    env = {**os.environ, "DSV_CACHE_DIR": server[2]}
    cmd = [sys.executable, "-m", "dsv.server.cli", "serve", "--device", "cpu", "--port", str(port)]
    cmd += ["--max-total-tokens", "1024", "--page-size", "16", "--graceful-shutdown-timeout", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        body = {"prompt": "x", "max_tokens": 900, "ignore_eos": True, "stream": True}
        with (
            httpx.Client(base_url=base, timeout=30) as http,
            http.stream("POST", "/v1/completions", json=body) as r,
        ):
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            text = ""
            with contextlib.suppress(httpx.RemoteProtocolError):  # cut when the grace period ends
                text = "".join(lines)
        assert proc.wait(30) == 0, proc.stderr.read().decode()
        assert "length" not in text  # cut short, not run to the end
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bench_and_eval_clients_end_to_end(server, tmp_path):
    """`dsv bench serving` and `dsv eval gsm8k|gpqa` against this live server on the embedded default model."""
    import json

    from dsv.server.cli import main

    base = server[0]
    common = ["--base-url", base, "--model", "dsv-test", "--api-key", API_KEY]
    bench_out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "serving",
                *common,
                "--num-prompts",
                "4",
                "--random-input-len",
                "16",
                "--random-output-len",
                "4",
                "--output-file",
                str(bench_out),
                "--disable-tqdm",
            ]
        )
        == 0
    )
    result = json.loads(bench_out.read_text())
    assert result["metrics"]["completed"] == 4
    assert (
        main(
            [
                "eval",
                "gsm8k",
                *common,
                "--num-questions",
                "2",
                "--num-shots",
                "1",
                "--max-tokens",
                "8",
                "--disable-tqdm",
            ]
        )
        == 0
    )
    assert main(["eval", "gpqa", *common, "--num-examples", "2", "--max-tokens", "8", "--disable-tqdm"]) == 0
