"""``dsv serve``: the OpenAI-compatible HTTP server, with SGLang's launch flags.

Flags whose feature is not built (tensor/data/expert parallelism, DP attention, speculative decoding)
are accepted by the parser so SGLang command lines read naturally, but refused at start with a message
saying so: they are never silently ignored.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from dsv.engine.config import add_engine_arguments, engine_config_from_args

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "rocm", "npu")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "--model-path",
        dest="model",
        default=None,
        help="folder or cached Hub id (default: embedded tiny model)",
    )
    p.add_argument(
        "--tokenizer", "--tokenizer-path", dest="tokenizer", default=None, help="folder with tokenizer.json"
    )
    p.add_argument(
        "--device", default=None, help=f"backend: {', '.join(DEVICES)} (default: the best one found)"
    )
    p.add_argument("--dtype", default="auto", help="bfloat16, float32 or auto (the checkpoint's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--tp", "--tp-size", dest="tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--dp", "--dp-size", dest="dp", type=int, default=1, help="data parallel size")
    p.add_argument("--ep", "--ep-size", dest="ep", type=int, default=1, help="expert parallel size")
    p.add_argument("--enable-dp-attention", action="store_true")
    add_engine_arguments(p)
    # SGLang's later spellings of the NSA kernel flags (same destinations as --nsa-prefill/--nsa-decode).
    p.add_argument("--nsa-prefill-backend", dest="nsa_prefill", help=argparse.SUPPRESS)
    p.add_argument("--nsa-decode-backend", dest="nsa_decode", help=argparse.SUPPRESS)
    p.add_argument("--context-length", dest="max_model_len", type=int, help="alias of --max-model-len")
    p.add_argument("--speculative-algorithm", default=None, help="e.g. EAGLE (MTP); not built yet")
    p.add_argument("--speculative-num-steps", type=int, default=None)
    p.add_argument("--speculative-eagle-topk", type=int, default=None)
    p.add_argument("--speculative-num-draft-tokens", type=int, default=None)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: --model)")
    # A sub-command flag of its own: the top-level --log-level default must not be overwritten here.
    p.add_argument("--log-level", dest="serve_log_level", default=None, help="debug, info, warning, error")
    p.add_argument("--trust-remote-code", action="store_true", help="accepted for SGLang compatibility")
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=4096,
        help="requests waiting beyond the running ones (429 above)",
    )
    p.add_argument(
        "--max-request-bytes", type=int, default=32 * 2**20, help="largest request body (413 above)"
    )
    p.add_argument(
        "--graceful-shutdown-timeout", type=float, default=30.0, help="seconds SIGTERM lets streams finish"
    )


def unsupported(args: argparse.Namespace) -> list[str]:
    """Messages for the flags asking for features that are not built yet."""
    out = []
    for flag in ("tp", "dp", "ep"):
        value = getattr(args, flag)
        if value != 1:
            out.append(f"--{flag} {value}: {flag.upper()} parallelism is not built yet (only --{flag} 1)")
    if args.enable_dp_attention:
        out.append("--enable-dp-attention: DP attention is not built yet")
    spec = {
        "--speculative-algorithm": args.speculative_algorithm,
        "--speculative-num-steps": args.speculative_num_steps,
        "--speculative-eagle-topk": args.speculative_eagle_topk,
        "--speculative-num-draft-tokens": args.speculative_num_draft_tokens,
    }
    given = [name for name, v in spec.items() if v is not None]
    if given:
        out.append(f"{', '.join(given)}: speculative decoding (MTP/EAGLE) is not built yet")
    return out


def build_server(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """Load the engine and build the app; raises SystemExit with a clear message on a bad setup."""
    from dsv.backend.interface import KernelUnavailable
    from dsv.backend.registry import BackendError
    from dsv.engine.llm_engine import LLMEngine
    from dsv.model.resolve import ModelNotFound
    from dsv.server.app import create_app
    from dsv.server.engine_client import AsyncEngine
    from dsv.tokenizer import Tokenizer

    problems = unsupported(args)
    if problems:
        raise SystemExit("dsv serve: " + "; ".join(problems))
    try:
        config = engine_config_from_args(args)
        engine = LLMEngine.from_pretrained(args.model, args.device, args.dtype, config)
    except BackendError as exc:
        raise SystemExit(f"dsv serve: --device {args.device or '(auto)'}: {exc}") from exc
    except (ModelNotFound, ValueError, KernelUnavailable) as exc:
        raise SystemExit(f"dsv serve: {exc}") from exc
    if args.tokenizer:
        path = Path(args.tokenizer)
        if not path.exists():
            raise SystemExit(f"dsv serve: --tokenizer {args.tokenizer}: no such file or folder")
        engine.tokenizer = Tokenizer.from_file(path) if path.is_file() else Tokenizer.from_model_dir(path)
    name = args.served_model_name or args.model or "dsv-default"
    max_pending = config.max_running_requests + args.max_queued_requests
    client = AsyncEngine(engine, max_pending=max_pending)
    server_args = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "api_key"}
    app = create_app(
        client,
        engine.tokenizer,
        name,
        args.api_key,
        max_body_bytes=args.max_request_bytes,
        model_path=args.model,
        tokenizer_path=args.tokenizer or args.model,
        server_args=server_args,
    )
    return app, client, server_args


def run(args: argparse.Namespace) -> int:
    import uvicorn

    level = (args.serve_log_level or logging.getLevelName(logging.getLogger().level)).lower()
    if args.serve_log_level:
        logging.getLogger().setLevel(args.serve_log_level.upper())
    app, client, _ = build_server(args)

    class Server(uvicorn.Server):
        # SIGTERM/SIGINT: refuse new requests at once (503); uvicorn then stops accepting, lets
        # in-flight streams finish for --graceful-shutdown-timeout, cancels the rest (their requests
        # are aborted), and the app's lifespan stops the engine. run() then returns 0.
        def handle_exit(self, sig: int, frame: Any) -> None:
            client.begin_drain()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                # uvicorn re-raises captured signals after shutdown (death by signal); a drained
                # SIGTERM is an orderly stop, so exit 0 instead.
                self._captured_signals.remove(sig)

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=level if level in ("critical", "error", "warning", "info", "debug", "trace") else "info",
        timeout_graceful_shutdown=args.graceful_shutdown_timeout,
    )
    print(
        f"dsv serve: http://{args.host}:{args.port} (model {app.state.dsv.served_model_name})",
        file=sys.stderr,
    )
    Server(config).run()
    return 0
