"""`reftkit serve`: an OpenAI-compatible server for one base model with ReFT adapters and steering vectors.

Adapter and vector folders are checked from their files before the model loads; FastAPI and uvicorn (the
`serve` extra) are imported only by this command."""

from __future__ import annotations

import argparse
import os

from reftkit.cli.common import (
    BASE_MODEL_HELP, DEFAULT_MODEL, add_device_arguments, check_adapter_for_cli, load_for_cli, positive_int, status,
)
from reftkit.errors import ConfigError, MissingDependencyError


def _named_folder(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, folder


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=BASE_MODEL_HELP)
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the name clients send as `model` for the base model (default: the --model value)")
    parser.add_argument("--adapter", action="append", type=_named_folder, metavar="NAME=DIR",
                        help="a ReFT adapter folder served as model NAME; repeat for more")
    parser.add_argument("--steer", action="append", type=_named_folder, metavar="NAME=DIR",
                        help="a steering-vector folder clients select with extra_body={'reftkit': {'steer': "
                             "[{'name': NAME, 'coefficient': C}]}}; repeat for more")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: loopback)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    parser.add_argument("--api-key", action="append", metavar="KEY",
                        help="require 'Authorization: Bearer KEY' (repeatable; also $REFTKIT_API_KEY); "
                             "/health stays open (default: no key)")
    parser.add_argument("--max-batch-size", type=positive_int, default=8, metavar="N",
                        help="most rows per batch (default %(default)s)")
    parser.add_argument("--max-wait-ms", type=_non_negative, default=10.0, metavar="MS",
                        help="how long the first request of a batch waits for company (default %(default)s)")
    parser.add_argument("--max-queue", type=positive_int, default=64, metavar="N",
                        help="most requests waiting; more are refused with 503 (default %(default)s)")
    parser.add_argument("--max-distinct", type=positive_int, default=8, metavar="N",
                        help="most distinct adapter/steering settings per batch; more wait (default %(default)s)")
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=2048, metavar="N",
                        help="longest prompt accepted, in tokens (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=512, metavar="N",
                        help="largest max_tokens accepted, and the default (default %(default)s)")
    parser.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, metavar="N",
                        help="largest request body; larger ones get 413 (default %(default)s)")
    parser.add_argument("--request-timeout", type=_non_negative, default=600.0, metavar="S",
                        help="seconds a request may take before it is cancelled (default %(default)s)")
    parser.add_argument("--shutdown-grace", type=_non_negative, default=10.0, metavar="S",
                        help="seconds in-flight requests get to finish on shutdown (default %(default)s)")
    parser.add_argument("--adapter-dir", metavar="DIR",
                        help="the only folder runtime adapter loads may read from (with --allow-adapter-updates)")
    parser.add_argument("--allow-adapter-updates", action="store_true",
                        help="enable POST /v1/adapters and DELETE /v1/adapters/NAME (needs --adapter-dir)")
    add_device_arguments(parser)


def run_serve(args: argparse.Namespace) -> int:
    from reftkit.serve.config import ServerConfig

    args.adapter, args.steer, args.api_key = args.adapter or [], args.steer or [], args.api_key or []
    model_name = args.model
    for name, folder in args.adapter:  # a missing or broken folder, or one for another model, fails before loading
        model_name = check_adapter_for_cli(folder, model_name)
    for name, folder in args.steer:
        if not os.path.isfile(os.path.join(folder, "vector_config.json")):
            raise ConfigError(f"--steer {name}={folder}: no vector_config.json there; pass a folder written by "
                              "`reftkit steer extract` or SteeringVector.save")
    names = [n for n, _ in args.adapter] + [n for n, _ in args.steer]
    if len(set(names)) != len(names):
        raise ConfigError(f"--adapter and --steer names must be distinct, got {names}")
    if args.adapter_dir and not os.path.isdir(args.adapter_dir):
        raise ConfigError(f"--adapter-dir {args.adapter_dir}: no such folder")
    model_name = model_name or DEFAULT_MODEL
    keys = list(args.api_key) + ([os.environ["REFTKIT_API_KEY"]] if os.environ.get("REFTKIT_API_KEY") else [])
    config = ServerConfig(model_name=args.served_model_name or model_name, max_batch_size=args.max_batch_size,
                          max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, max_distinct=args.max_distinct,
                          max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                          max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout,
                          shutdown_grace_s=args.shutdown_grace, api_keys=keys, adapter_dir=args.adapter_dir,
                          allow_adapter_updates=args.allow_adapter_updates)
    try:
        import uvicorn

        from reftkit.serve.app import build_app
    except ImportError as e:
        raise MissingDependencyError(f"reftkit serve needs FastAPI and uvicorn ({e}): pip install 'reftkit[serve]'") \
            from None
    model, tokenizer = load_for_cli(model_name, args)
    app = build_app(model, tokenizer, config, adapters=dict(args.adapter), vectors=dict(args.steer))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not keys:
        status(f"warning: listening on {args.host} without an API key")
    status(f"serving {config.model_name} on http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=max(1, int(args.shutdown_grace)))
    return 0
