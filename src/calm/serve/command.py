"""``calm serve CHECKPOINT``: load a CALM or baseline checkpoint and serve it over HTTP.

    calm serve runs/calm/checkpoint --host 127.0.0.1 --port 8000 --max-rows 32 --max-queue 256

uvicorn runs the `calm.serve.app` app on a socket bound here (``--port 0`` picks a free port;
the line ``calm serve: listening on http://HOST:PORT`` on stderr says which). SIGTERM (and
Ctrl-C) stop accepting connections, let in-flight requests finish for up to ``--grace``
seconds (then cancel them), stop the engine and exit with status 0.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys

from calm.cli import (
    add_head_sampling_arguments,
    add_no_verify_argument,
    add_official_ae_argument,
    add_threads_argument,
    apply_head_sampling,
)

MISSING_EXTRA = (
    'calm serve needs FastAPI and uvicorn: pip install -e ".[serve]" (or pip install fastapi uvicorn)'
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="CHECKPOINT",
        help="checkpoint directory (CALM or token-level model), or a Hugging Face repo id in the local cache",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    parser.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model id clients use (default: CHECKPOINT)",
    )
    parser.add_argument("--max-rows", type=int, default=32, help="sequences decoded together in one batch")
    parser.add_argument(
        "--max-queue", type=int, default=256, help="sequences waiting for a row beyond those (more: 429)"
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds in-flight requests may take to finish after SIGTERM",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    parser.add_argument(
        "--dtype", choices=["model", "bfloat16"], default="model", help="run the model in this dtype"
    )
    add_threads_argument(parser)
    parser.add_argument(
        "--no-fused-kernel",
        action="store_true",
        help="CALM on the CPU: decode small T = 1 steps with the PyTorch modules instead of the compiled kernel",
    )
    add_head_sampling_arguments(parser)
    add_official_ae_argument(parser)
    add_no_verify_argument(parser)
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's",
    )


def run_serve(args) -> int:
    try:
        import uvicorn

        from calm.serve.app import create_app
    except ImportError as err:
        print(f"calm serve: error: {MISSING_EXTRA} ({err})", file=sys.stderr)
        return 2
    import torch

    from calm.checkpoint import load_model
    from calm.distributed import resolve_device
    from calm.serve.engine import Engine

    if args.max_rows < 1 or args.max_queue < 0:
        raise ValueError(
            f"--max-rows must be >= 1 and --max-queue >= 0, got {args.max_rows}, {args.max_queue}"
        )
    device = resolve_device(args.device)
    model = load_model(args.model, device=device, ae_path=args.ae, verify=not args.no_verify)
    kind = getattr(model.config, "kind", None)
    if kind not in ("calm", "ar"):
        raise ValueError(f"{args.model} holds a {kind} model; calm serve needs a CALM or token-level model")
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    apply_head_sampling(model, args)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (tokenizer.json); cannot serve text")
    engine = Engine(
        model,
        max_rows=args.max_rows,
        max_queue=args.max_queue,
        fused_kernel=False if args.no_fused_kernel else None,
    )
    name = args.served_model_name or str(args.model)
    app = create_app(engine, tokenizer, name)

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as err:
        raise OSError(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from None
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app, log_level=args.log_level, timeout_graceful_shutdown=args.grace, lifespan="on"
    )
    server = uvicorn.Server(config)

    # uvicorn handles SIGTERM/SIGINT while serving (graceful drain) and re-raises the signal
    # once it is done. A SIGTERM that asked for that drain has been served: exit 0, not 143.
    def on_term(signum, frame):
        server.should_exit = True

    signal.signal(signal.SIGTERM, on_term)
    print(
        f"calm serve: {kind} model {name!r} on {device}, listening on http://{host}:{port} "
        f"(max rows {args.max_rows}, max queue {args.max_queue})",
        file=sys.stderr,
        flush=True,
    )
    server.run(sockets=[sock])
    return 0
