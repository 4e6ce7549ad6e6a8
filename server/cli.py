"""`dspark`: serve, generate, bench.

Engine flags are derived from the fields of `EngineConfig` and its nested configs, so a new
config field is a new flag without touching this file.
"""

import argparse
import importlib
import logging
import sys
import types
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any

from engine.config import CacheConfig, EngineConfig, SpeculativeConfig
from scheduler import SchedulerConfig
from server import envs
from server.reasoning import PARSERS

# Flags handled explicitly (positional in EngineConfig.from_options) or not meaningful as flags.
_EXPLICIT = {"model", "device", "dtype", "cache", "scheduler", "speculative"}
BENCHMARKS = {"serve": "bench.serve", "engine": "bench.engine", "spec": "bench.spec",
              "compare": "bench.compare", "kernels": "bench.kernels",
              "peers": "bench.peers", "grammar": "bench.grammar",
              "predicted": "bench.predicted", "prefix": "bench.prefix", "soak": "bench.soak"}


def _scalar_type(tp: Any) -> type | None:
    """int / float / str for `int`, `int | None`, ...; None for anything a flag cannot hold."""
    if isinstance(tp, types.UnionType):
        args = [a for a in tp.__args__ if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if tp in (int, float, str, bool) else None


def _engine_fields() -> list[tuple[str, type, Any, str]]:
    out = []
    for cls in (EngineConfig, CacheConfig, SchedulerConfig, SpeculativeConfig):
        for f in fields(cls):
            tp = _scalar_type(f.type)
            if f.name in _EXPLICIT or tp is None:
                continue
            default = f.default if f.default is not MISSING else None
            out.append((f.name, tp, default, cls.__name__))
    return out


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=None,
                       help="Hugging Face directory or .gguf file (default: embedded SmolLM2-135M)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    group.add_argument("--dtype", default=None,
                       help="float32 / bfloat16 / float16 (default: bf16 on CUDA and bf16 CPUs)")
    for name, tp, default, owner in _engine_fields():
        flag, help_ = f"--{name.replace('_', '-')}", f"{owner}.{name} (default: {default})"
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
            if name.startswith("enable_"):  # --no-prefix-caching, as vLLM users type it
                group.add_argument(f"--no-{name[len('enable_'):].replace('_', '-')}", dest=name,
                                   action="store_false", default=None, help=f"same as --no-{flag[2:]}")
        else:
            group.add_argument(flag, type=tp, default=None, help=help_)


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags the user set, as `EngineConfig.from_options` and `LLM` take them."""
    return {name: getattr(args, name) for name, *_ in _engine_fields()
            if getattr(args, name) is not None}


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig.from_options(args.model, args.device, args.dtype, **_engine_options(args))


# `dspark serve` on the embedded default model speculates with its shipped DSpark drafter
# (trained for that model only) at the γ it was trained and evaluated with.
DEFAULT_SERVE_DRAFT, DEFAULT_SERVE_NUM_DRAFT_TOKENS = "dspark", 7
# A server sheds load past this many queued requests (503 + Retry-After) rather than letting
# TTFT grow without bound; the offline engine queues everything it is given.
DEFAULT_SERVE_MAX_WAITING = 512


def apply_serve_draft_default(args: argparse.Namespace) -> None:
    """No --draft on the default model: the shipped DSpark drafter; `--draft none`: plain."""
    if args.draft is None and args.model is None:
        args.draft = DEFAULT_SERVE_DRAFT
        if args.num_draft_tokens is None:
            args.num_draft_tokens = DEFAULT_SERVE_NUM_DRAFT_TOKENS
    elif args.draft == "none":
        args.draft = None


def _serve(args: argparse.Namespace) -> int:
    from server.config import ServerConfig
    from server.launch import serve

    apply_serve_draft_default(args)
    config = ServerConfig(engine=engine_config(args), host=args.host, port=args.port,
                          api_key=args.api_key, api_keys_file=args.api_keys_file,
                          request_timeout=args.request_timeout or None,
                          served_model_name=args.served_model_name,
                          max_request_bytes=args.max_request_bytes,
                          drain_timeout=args.drain_timeout, log_level=args.log_level,
                          reasoning_parser=args.reasoning_parser,
                          cors_origins=tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()))
    return serve(config)


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    llm = LLM(args.model, args.device, args.dtype, **_engine_options(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    result = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    print(result.text)
    return 0


def _bench(args: argparse.Namespace) -> int:
    module = BENCHMARKS[args.benchmark]
    try:
        bench = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        print(f"benchmark {args.benchmark!r} is not available ({module} is missing)",
              file=sys.stderr)
        return 2
    return int(bench.main(args.args) or 0)


def _draft(args: argparse.Namespace) -> int:
    from draft.cli import main as draft_main

    return int(draft_main(args.args) or 0)


def _profile(args: argparse.Namespace) -> int:
    from bench.profile import profile_and_plot

    profile_and_plot(engine_config(args), refresh=args.refresh)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("--host", default=envs.get("DSPARK_HOST"), help="address to bind")
    serve.add_argument("--port", type=int, default=envs.get("DSPARK_PORT"),
                       help="0 picks a free port (logged at startup)")
    serve.add_argument("--api-key", default=envs.get("DSPARK_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/* (env DSPARK_API_KEY)")
    serve.add_argument("--api-keys-file", default=envs.get("DSPARK_API_KEYS_FILE"),
                       help="JSON file of API keys, each with optional limits: max_concurrent "
                            "requests and tokens_per_minute (429 beyond them); see server/tenants.py")
    serve.add_argument("--request-timeout", type=float, default=envs.get("DSPARK_REQUEST_TIMEOUT"),
                       help="abort a request still running after this many seconds: 504, or an "
                            "error event when streaming (default 0: no limit)")
    serve.add_argument("--served-model-name", default=None,
                       help="the `model` clients send (default: the checkpoint's name)")
    serve.add_argument("--max-request-bytes", type=int,
                       default=envs.get("DSPARK_MAX_REQUEST_BYTES"),
                       help="larger request bodies get 413 (default 1 MiB)")
    serve.add_argument("--drain-timeout", type=float, default=envs.get("DSPARK_DRAIN_TIMEOUT"),
                       help="seconds running requests get to finish after SIGTERM")
    serve.add_argument("--log-level", default=envs.get("DSPARK_LOG_LEVEL"),
                       help="debug, info, warning, error")
    serve.add_argument("--reasoning-parser", choices=PARSERS, default=envs.get("DSPARK_REASONING_PARSER"),
                       help="return think blocks as reasoning_content: auto (when the chat template "
                            "has them), think (always), none")
    serve.add_argument("--cors-origins", default=envs.get("DSPARK_CORS_ORIGINS"),
                       help="comma-separated origins allowed to call the API from a browser "
                            "(default: none, CORS off)")
    add_engine_args(serve)
    serve.set_defaults(func=_serve, max_waiting=DEFAULT_SERVE_MAX_WAITING)
    for action in serve._actions:
        if action.dest == "max_waiting":
            action.help = (f"queued requests beyond this get 503 with Retry-After (default "
                           f"{DEFAULT_SERVE_MAX_WAITING}; 0: no limit)")

    gen = sub.add_parser("generate", help="print one chat reply of the model")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--log-level", default="warning")
    add_engine_args(gen)
    gen.set_defaults(func=_generate)

    bench = sub.add_parser("bench", help="benchmarks: serve (HTTP sweep), engine (offline)")
    bench.add_argument("benchmark", choices=sorted(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER,
                       help="options of the benchmark (dspark bench serve --help)")
    bench.add_argument("--log-level", default="warning")
    bench.set_defaults(func=_bench)

    draft = sub.add_parser("draft", help="drafters: data | train | calibrate | eval")
    draft.add_argument("args", nargs=argparse.REMAINDER, help="dspark draft --help")
    draft.add_argument("--log-level", default="info")
    draft.set_defaults(func=_draft)

    profile = sub.add_parser("profile", help="measure, print and plot the SPS curve")
    profile.add_argument("--refresh", action="store_true", help="measure even if cached")
    profile.add_argument("--log-level", default="info")
    add_engine_args(profile)
    profile.set_defaults(func=_profile)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
