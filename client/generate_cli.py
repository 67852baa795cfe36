"""The `shardline generate` subcommand: send one prompt to a router and print the completion.

Sampling options left out are not sent, so the router's defaults apply (`--default-max-new-tokens`
of the server, temperature 1, ...). Text deltas stream to stdout as they arrive; a one-line summary (finish reason, token counts,
timings) goes to stderr, so `shardline generate ... > out.txt` captures the text alone. `--json`
prints one JSON object (the GenerateResult fields plus `elapsed_s`) instead. `--api-key-file` and
`--tls-ca-file` (or `--tls`) reach a router started with --api-key-file / --tls-cert-file.

Exit status: 0 on success; 2 when the router rejects the request (INVALID_ARGUMENT: it can never
succeed as sent, like an argparse usage error) or the arguments are inconsistent; 1 for every other
ShardlineError (overloaded, unauthenticated, unavailable, deadline, cancelled...); 130 on Ctrl-C. Errors print as
`error: CODE: message` on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, TextIO

from shardline.client import connection
from shardline.client.errors import InvalidRequestError, ShardlineError
from shardline.client.results import StreamChunk
from shardline.client.sdk import Client
from shardline.common import flags

DEFAULT_TARGET = "localhost:8500"
TARGET_ENV = "SHARDLINE_TARGET"
EXIT_ERROR, EXIT_INVALID, EXIT_INTERRUPTED = flags.EXIT_ERROR, flags.EXIT_USAGE, flags.EXIT_INTERRUPTED


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `generate` on `subparsers` with `run` as its handler; returns its parser."""
    parser = subparsers.add_parser(
        "generate",
        help="generate a completion for one prompt (streams the text to stdout)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="exit status: 0 ok, 1 server error, 2 invalid request, 130 interrupted",
        formatter_class=flags.HelpFormatter,
    )
    parser.add_argument("prompt", metavar="PROMPT", help="prompt text, or - to read it from stdin")
    parser.add_argument("--chat", action="store_true",
                        help="send PROMPT as a user message: the router applies the model's chat template")
    parser.add_argument("--system", metavar="TEXT", default=None,
                        help="with --chat: a system message before the user's")
    parser.add_argument("--target", metavar="ADDR", default=os.environ.get(TARGET_ENV, DEFAULT_TARGET),
                        help=f"router address, host:port or unix:///path (env {TARGET_ENV})")
    connection.add_arguments(parser)
    _add_sampling_options(parser)
    parser.add_argument("--priority", type=int, metavar="N", default=0,
                        help="scheduling priority; higher is served first")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", default=None,
                        help="seconds before giving up (retries included)")
    parser.add_argument("--json", action="store_true", help="print one JSON result object instead of streaming")
    parser.set_defaults(run=run)
    return parser


SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop", "top_logprobs")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """The generation parameters, mirroring `Parameters` in serving.proto; unset ones are not sent."""
    unset = argparse.SUPPRESS  # absent from the namespace, so not sent: the router's default applies
    parser.add_argument("--max-new-tokens", type=int, metavar="N", default=unset,
                        help="most tokens to generate (default: the router's --default-max-new-tokens)")
    parser.add_argument("--temperature", type=float, metavar="T", default=unset,
                        help="softmax temperature; 0 is greedy (default: 1.0)")
    parser.add_argument("--top-k", type=int, metavar="K", default=unset,
                        help="sample among the k most likely tokens; 0 disables (default: 0)")
    parser.add_argument("--top-p", type=float, metavar="P", default=unset,
                        help="nucleus sampling probability mass, in (0, 1] (default: 1.0)")
    parser.add_argument("--repetition-penalty", type=float, metavar="R", default=unset,
                        help="> 1 discourages tokens already in the prompt or output (default: 1.0)")
    parser.add_argument("--seed", type=int, metavar="N", default=unset,
                        help="sampling seed (default: the router picks one)")
    parser.add_argument("--stop", action="append", default=unset, metavar="S",
                        help="stop when this string appears (repeatable, the output ends before it)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    parser.add_argument("--logprobs", action="store_true", help="request log-probabilities (shown with --json)")
    parser.add_argument("--top-logprobs", type=int, metavar="N", default=argparse.SUPPRESS,
                        help="with --logprobs: also the N most likely tokens at each step, N <= 20 (shown with --json)")


def _params(args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    """The SDK keyword arguments of the parsed options: the input (prompt, or messages with --chat)
    and the sampling options that were given."""
    given = {name: getattr(args, name) for name in SAMPLING if hasattr(args, name)}
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        given["messages"] = [*system, {"role": "user", "content": prompt}]
    else:
        given["prompt"] = prompt
    return given | {"ignore_eos": args.ignore_eos, "logprobs": args.logprobs, "priority": args.priority}


def run(args: argparse.Namespace) -> int:
    """Handle `shardline generate`; returns the exit status (see the module docstring)."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.system is not None and not args.chat:
        print("error: --system needs --chat", file=sys.stderr)
        return EXIT_INVALID
    try:
        options = connection.client_options(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID
    try:
        with Client(args.target, **options) as client:
            if args.json:
                return _print_json(client, prompt, args)
            return _stream(client, prompt, args, sys.stdout, sys.stderr)
    except InvalidRequestError as error:  # the router's refusal, or the SDK's own checks (a negative --seed)
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID
    except ShardlineError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


def _print_json(client: Client, prompt: str, args: argparse.Namespace) -> int:
    """Generate whole and print the result as one JSON object on stdout."""
    start = time.monotonic()
    result = client.generate(timeout=args.timeout, **_params(args, prompt))
    payload = dataclasses.asdict(result) | {"elapsed_s": round(time.monotonic() - start, 4)}
    print(json.dumps(payload, ensure_ascii=False))
    return 0


def _stream(client: Client, prompt: str, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Write each text delta to `out` as it arrives, then the summary line to `err`."""
    start = time.monotonic()
    first: float | None = None
    last: StreamChunk | None = None
    try:
        for last in client.generate_stream(timeout=args.timeout, **_params(args, prompt)):
            first = time.monotonic() - start if first is None else first
            out.write(last.text)
            out.flush()
    finally:
        if last is not None:
            out.write("\n")  # end the text line, even when an error cuts the stream
            out.flush()
    print(_summary(last, first, time.monotonic() - start), file=err)
    return 0


def _summary(last: StreamChunk | None, first_s: float | None, total_s: float) -> str:
    """`[finish=length tokens=5+64 time=1.23s first=0.05s 52.0 tok/s id=...]`."""
    if last is None:
        return f"[no tokens time={total_s:.2f}s]"
    completion = last.usage.completion_tokens if last.usage else 0
    prompt = last.usage.prompt_tokens if last.usage else 0
    rate = completion / total_s if total_s > 0 else 0.0
    first = f" first={first_s:.2f}s" if first_s is not None else ""
    return (f"[finish={last.finish_reason} tokens={prompt}+{completion} time={total_s:.2f}s{first} "
            f"{rate:.1f} tok/s id={last.request_id}]")
