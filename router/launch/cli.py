"""`shardline launch` (router + local shard processes) and `shardline router` (split deployments)."""

from __future__ import annotations

import argparse
from pathlib import Path

from shardline.router.group import nccl
from shardline.router.api import security_config
from shardline.router.config import RouterConfig
from shardline.common import flags, logs
from shardline.shard.cli import add_group_arguments

DEFAULTS = RouterConfig(model=Path("."))


class Explicit(argparse.Action):
    """Stores the value and records that the user gave the flag (in `namespace.explicit`)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.explicit = frozenset(getattr(namespace, "explicit", frozenset()) | {self.dest})


def add_router_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--host", default=d.host, help="address the public gRPC API listens on")
    p.add_argument("--port", type=flags.port("any free port"), default=d.port,
                   help="port of the public gRPC API; 0 = any free port (named in the ready line)")
    p.add_argument("--http-port", type=flags.port("off"), default=d.http_port,
                   help="port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /health) served by the router itself; 0 turns it off")
    p.add_argument("--served-model-name", default=d.served_model_name,
                   help="model id of the HTTP API; default: the model folder's name")
    p.add_argument("--chat-template", type=Path, default=d.chat_template, metavar="FILE",
                   help="Jinja chat template for chat requests, instead of the tokenizer's own")
    p.add_argument("--max-concurrent-requests", type=flags.at_least(1), default=d.max_concurrent_requests,
                   help="requests admitted at once (running + waiting); more get RESOURCE_EXHAUSTED")
    p.add_argument("--max-input-tokens", type=flags.at_least(1), default=d.max_input_tokens, action=Explicit,
                   help="longest prompt in tokens; at most --max-total-tokens - 1 (a default above that is lowered, "
                        "saying so at start)")
    p.add_argument("--max-request-bytes", type=flags.at_least(0), default=d.max_request_bytes,
                   help="longest text prompt in UTF-8 bytes, refused before tokenizing; 0 = 32 x --max-input-tokens")
    p.add_argument("--max-total-tokens", type=flags.at_least(2), default=d.max_total_tokens, action=Explicit,
                   help="longest prompt + max_new_tokens of one request; at most the model's "
                        "max_position_embeddings (a larger value is lowered to it, saying so at start)")
    p.add_argument("--max-batch-prefill-tokens", type=flags.at_least(0), default=d.max_batch_prefill_tokens,
                   help="token budget of one step: each decoding request costs 1 and prompts fill the "
                        "rest in chunks (a longer prompt is prefilled over several steps while the "
                        "running streams keep decoding, so this bounds their longest gap); "
                        "0 = 256 on CPU shards, 2048 on GPU shards")
    p.add_argument("--max-batch-total-tokens", type=flags.at_least(0), default=d.max_batch_total_tokens,
                   help="KV tokens in flight across all requests; 0 = the shards' measured capacity, on CPU "
                        "shards at most min(--max-batch-size, --max-concurrent-requests) x --max-total-tokens "
                        "(what can run at once)")
    p.add_argument("--max-batch-size", type=flags.at_least(1), default=d.max_batch_size,
                   help="requests decoded together")
    p.add_argument("--prefix-cache", choices=("on", "off"), default="on" if d.prefix_cache else "off",
                   help="keep computed KV blocks and reuse them for requests that share a prefix "
                        "(evicted least recently used when blocks run out)")
    p.add_argument("--speculative", choices=("off", "ngram"), default=d.speculative,
                   help="speculative decoding: ngram proposes the tokens that followed the latest earlier "
                        "occurrence of the output's last tokens (in prompt or output); the shards verify them "
                        "in one step. Output is unchanged (greedy and seeded sampling); faster when output "
                        "copies from the context")
    p.add_argument("--num-speculative-tokens", type=flags.at_least(1), default=d.num_speculative_tokens,
                   help="most tokens proposed per request per step")
    p.add_argument("--ngram-min", type=flags.at_least(1), default=d.ngram_min,
                   help="shortest suffix of the sequence matched to propose (longer ones are tried first)")
    p.add_argument("--ngram-max", type=flags.at_least(1), default=d.ngram_max,
                   help="longest suffix of the sequence matched to propose")
    p.add_argument("--speculative-max-batch", type=flags.at_least(1), default=d.speculative_max_batch,
                   help="speculate only while at most this many requests decode (a larger batch keeps the "
                        "device busy without it)")
    p.add_argument("--grammar-timeout", type=flags.above(0), default=d.grammar_timeout,
                   help="seconds a structured-output constraint (schema, regex, choice, grammar) may take to "
                        "compile; a slower one is refused with INVALID_ARGUMENT")
    p.add_argument("--max-grammar-bytes", type=flags.at_least(1), default=d.max_grammar_bytes,
                   help="longest structured-output constraint source, in UTF-8 bytes")
    p.add_argument("--max-stop-sequences", type=flags.at_least(0), default=d.max_stop_sequences,
                   help="stop strings allowed per request")
    p.add_argument("--default-max-new-tokens", type=flags.at_least(1), default=d.default_max_new_tokens,
                   help="max_new_tokens of a request that sets none")
    p.add_argument("--step-timeout", type=flags.above(0), default=d.step_timeout,
                   help="seconds one step may take on the shards before the group counts as hung")
    p.add_argument("--startup-timeout", type=flags.above(0), default=d.startup_timeout,
                   help="seconds to wait for the shards to load and warm up")
    p.add_argument("--max-restarts", type=flags.at_least(0), default=5,
                   help="shard group failures tolerated within --restart-window before giving up (UNAVAILABLE)")
    p.add_argument("--restart-window", type=flags.above(0), default=300.0, help="seconds over which failures are counted")
    p.add_argument("--health-interval", type=flags.above(0), default=5.0,
                   help="seconds between health checks of the shards (also their timeout)")
    p.add_argument("--metrics-port", type=flags.port("off"), default=9400,
                   help="port of the Prometheus /metrics endpoint; 0 turns it off")
    p.add_argument("--shutdown-grace", type=flags.at_least(0, float), default=d.shutdown_grace,
                   help="seconds running requests get to finish on SIGTERM/Ctrl-C (a second Ctrl-C stops at once)")
    logs.add_arguments(p)
    security_config.add_arguments(p)
    p.set_defaults(explicit=frozenset())


def add_parser(sub: argparse._SubParsersAction) -> None:
    fmt = flags.HelpFormatter
    launch = sub.add_parser("launch", help="serve a model: the router plus one shard process per rank",
                            description="Start the router and tp x pp shard processes, wait until they "
                                        "are ready, and serve until SIGTERM/SIGINT.", formatter_class=fmt)
    launch.add_argument("--model", type=Path, default=None,
                        help="checkpoint directory; default: the bundled demo model")
    launch.add_argument("--socket-dir", type=Path, default=None,
                        help="folder for the shards' unix sockets, only this user's (created 0700; an existing "
                             "one others can read or that another user owns is refused); default: a fresh one "
                             "in the temporary directory, removed at exit")
    add_router_arguments(launch)
    add_group_arguments(launch)
    nccl.add_arguments(launch)
    launch.set_defaults(run=run_launch)
    router = sub.add_parser("router", help="run only the router, against shards started elsewhere",
                            description="Serve the public API in front of an existing shard group "
                                        "(`shardline shard` processes).", formatter_class=fmt)
    router.add_argument("--shards", required=True,
                        help="comma-separated shard addresses in rank order (host:port or unix:///path)")
    router.add_argument("--model", type=Path, required=True,
                        help="checkpoint directory (the router reads its tokenizer and config)")
    add_router_arguments(router)
    security_config.add_shard_client_arguments(router)
    router.set_defaults(run=run_router)


def run_launch(args: argparse.Namespace) -> int:
    from shardline.router.launch.serve import launch

    return launch(args)


def run_router(args: argparse.Namespace) -> int:
    from shardline.router.launch.serve import serve_split

    return serve_split(args)
