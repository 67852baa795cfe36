"""The request limits of issue 15, each a flag, in-process and without shards: --max-n,
--max-stop-length, --max-http-body-bytes and --max-message-bytes refuse what is over them with a
message naming the limit; the --help of `launch` documents every limit flag."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from router_harness import free_port
from shardline.client import Client, InvalidRequestError
from shardline.client.cli import build_parser
from shardline.router.config import RouterConfig
from shardline.router.api.security_config import SecurityConfig
from test_openai_refusals import _tokenizer
from test_public_server import CONFIG, ServerThread

LIMITS = SecurityConfig(max_n=3, max_stop_length=5, max_http_body_bytes=4096, max_message_bytes=8192)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerThread]:
    cfg = RouterConfig(**{**CONFIG.__dict__, "http_port": free_port(), "model": Path("/models/tiny"),
                          "security": LIMITS})
    running = ServerThread(cfg, _tokenizer(tmp_path_factory, llama_style=True))
    yield running
    running.stop()


def post(server: ServerThread, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.server.http_port}/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_max_n_counts_generations(server: ServerThread) -> None:
    status, body = post(server, json.dumps({"prompt": ["a", "b"], "n": 2, "max_tokens": 2}).encode())
    assert status == 400 and body["error"]["param"] == "n"
    assert body["error"]["message"] == "n x prompts = 4 generations, more than the server's max_n=3"
    status, body = post(server, json.dumps({"prompt": ["a"], "n": 3, "max_tokens": 2}).encode())
    assert status == 503  # within the limit: validated, and only the missing shards refuse it


def test_max_stop_length(server: ServerThread) -> None:
    with Client(server.target, retries=0) as client, pytest.raises(InvalidRequestError) as refused:
        client.generate("Hello", stop=["abcdef"])
    assert refused.value.message == "parameters.stop[0] has 6 characters, more than the limit of 5"


def test_max_http_body_bytes(server: ServerThread) -> None:
    status, body = post(server, json.dumps({"prompt": "x" * 5000}).encode())
    assert status == 413 and "more than the limit of 4096" in body["error"]["message"]


def test_max_message_bytes(server: ServerThread) -> None:
    with Client(server.target, retries=0) as client, pytest.raises(InvalidRequestError) as refused:
        client.tokenize("y" * 9000)
    assert "larger than gRPC accepts" in refused.value.message and "8192" in refused.value.message


@pytest.mark.parametrize("command", ["launch", "router"])
def test_every_limit_is_documented_in_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--max-message-bytes", "--max-http-body-bytes", "--max-metadata-entries", "--max-n",
                 "--max-stop-length", "--max-stop-sequences", "--max-request-bytes", "--max-input-tokens",
                 "--max-total-tokens", "--max-concurrent-requests", "--max-concurrent-requests-per-tenant",
                 "--max-priority-per-tenant", "--api-key-file", "--tls-cert-file", "--tls-client-ca-file"):
        assert flag in text, flag
    assert ("--shard-tls-ca-file" in text) == (command == "router")
