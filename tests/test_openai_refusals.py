"""The OpenAI-compatible HTTP API in-process, without shards, through the official `openai` client:
what it refuses and how (OpenAI's error shape, the router's own validation messages in the HTTP
field names), /health and /v1/models. With no shard group, a valid request gets 503: it was
validated and would have been admitted. Generation itself is tested in test_e2e_openai.py.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from transformers import AutoTokenizer

from checkpoints import build_tokenizer
from router_harness import free_port
from shardline.client import Client, InvalidRequestError
from shardline.router.config import RouterConfig
from test_public_server import CONFIG, ServerThread

USER = [{"role": "user", "content": "Hello"}]


def _tokenizer(tmp_path_factory, llama_style: bool):
    out = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(out, llama_style=llama_style)
    return AutoTokenizer.from_pretrained(str(out))


def _serve(tokenizer, **overrides) -> ServerThread:
    cfg = RouterConfig(**{**CONFIG.__dict__, "http_port": free_port(), "model": Path("/models/tiny-llama"),
                          **overrides})
    return ServerThread(cfg, tokenizer)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerThread]:
    running = _serve(_tokenizer(tmp_path_factory, llama_style=True))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server.http_port}/v1", api_key="none", max_retries=0)


def _status(url: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_models_and_health_before_the_shards_are_ready(server: ServerThread, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]  # the model folder's name
    status, body = _status(f"http://127.0.0.1:{server.server.http_port}/health")
    assert status == 503 and body == {"status": "NOT_SERVING"}  # no internal text on an open route


# (keyword arguments of completions.create, param, the message): the router's messages, in HTTP names
BAD_COMPLETIONS = [
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1, got 0"),
    ({"max_tokens": -5}, "max_tokens", "max_tokens must be at least 1, got -5"),
    ({"temperature": -1}, "temperature", "temperature must be a finite number >= 0, got -1"),
    ({"top_p": 1.5}, "top_p", "top_p must be in (0, 1], got 1.5"),
    ({"extra_body": {"top_k": -3}}, "top_k", "top_k must be at least 0 (0 or -1 disables it), got -3"),
    ({"stop": [""]}, "stop", "stop[0] is empty"),
    ({"prompt": ""}, "prompt", "prompt is empty"),
    ({"prompt": [5, 99999]}, "prompt", "prompt[1] = 99999 is outside the vocabulary (size 331)"),
    ({"prompt": "x" * 2049}, "prompt", "prompt has 2049 bytes, more than the server's max_request_bytes=2048 "
                                       "(32 bytes per token of the server's max_input_tokens=64)"),
    ({"prompt": "x" * 100}, "prompt", "prompt has 101 tokens, more than the server's max_input_tokens=64"),
    ({"n": 0}, "n", "n must be at least 1, got 0"),
    ({"logprobs": 21}, "logprobs", "logprobs must be at most 20, got 21"),
    ({"logprobs": -1}, "logprobs", "logprobs must be at least 0, got -1"),
    ({"presence_penalty": 0.5}, "presence_penalty", "presence_penalty is not supported by this server (got 0.5); "
                                                    "leave it out or send 0"),
    ({"extra_body": {"min_p": 0.1}}, "min_p", "min_p is not a field this server supports"),
]


@pytest.mark.parametrize(("kwargs", "param", "message"), BAD_COMPLETIONS)
def test_bad_completions_are_400_naming_the_field(client: openai.OpenAI, kwargs: dict, param: str,
                                                  message: str) -> None:
    kwargs = {"model": "tiny-llama", "prompt": "Hello", **kwargs}
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(**kwargs)
    assert error.value.status_code == 400
    assert error.value.body["message"] == message and error.value.body["param"] == param
    assert error.value.body["type"] == "invalid_request_error" and error.value.body["code"], error.value.body


def test_the_same_rule_says_the_same_over_grpc(server: ServerThread, client: openai.OpenAI) -> None:
    with Client(server.target, retries=0) as grpc_client, pytest.raises(InvalidRequestError) as native:
        grpc_client.generate("Hello", temperature=-1.0)
    with pytest.raises(openai.BadRequestError) as http:
        client.completions.create(model="tiny-llama", prompt="Hello", temperature=-1)
    assert native.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert native.value.message == "parameters." + http.value.body["message"]


# (path, raw body, message, param, code): bodies that do not parse, in this server's words
MALFORMED = [
    ("completions", '{"prompt": "x", "n": 9', "the request body is not valid JSON (Expecting ',' delimiter at "
                                              "character 22)", None, "invalid_json"),
    ("completions", "", "the request body is empty: send a JSON object", None, "invalid_json"),
    ("completions", "[1]", "the request body must be a JSON object, got [1]", None, "invalid_type"),
    ("completions", '{"n": 1}', "prompt is required", "prompt", "missing_required_parameter"),
    ("completions", '{"prompt": "x", "n": "two"}', 'n must be an integer, got "two"', "n", "invalid_type"),
    ("completions", '{"prompt": "x", "n": 1.5}', "n must be an integer, got 1.5", "n", "invalid_type"),
    ("completions", '{"prompt": "x", "stream": "maybe"}', 'stream must be true or false, got "maybe"', "stream",
     "invalid_type"),
    ("completions", '{"prompt": 5}', "prompt must be a string, an array of strings, an array of token ids or an "
                                     "array of arrays of token ids, got 5", "prompt", "invalid_type"),
    ("completions", '{"prompt": "x", "min_p": 0.1}', "min_p is not a field this server supports", "min_p",
     "unknown_parameter"),
    ("chat/completions", '{"messages": []}', "messages must have at least 1 item, got 0", "messages",
     "invalid_value"),
    ("chat/completions", '{"messages": [{"content": "x"}]}', "messages[0].role is required", "messages[0].role",
     "missing_required_parameter"),
    ("chat/completions", '{"messages": [{"role": "user", "content": [{"type": "image", "text": "x"}]}]}',
     "messages[0].content[0].type must be 'text', got \"image\"", "messages[0].content[0].type", "invalid_value"),
]


@pytest.mark.parametrize(("path", "raw", "message", "param", "code"), MALFORMED)
def test_a_body_that_does_not_parse_is_400_in_our_words(server: ServerThread, path: str, raw: str, message: str,
                                                        param: str | None, code: str) -> None:
    status, body = _status(f"http://127.0.0.1:{server.server.http_port}/v1/{path}", raw.encode())
    assert status == 400 and body == {"error": {"message": message, "type": "invalid_request_error",
                                                "param": param, "code": code}}, body


def test_every_error_object_has_a_code(server: ServerThread, client: openai.OpenAI) -> None:
    """Unknown routes and 404 too: OpenAI's four fields, `code` never null. (/health is no error object:
    200 SERVING or 503 NOT_SERVING, nothing else on an open route: test_models_and_health_before_...)"""
    port = server.server.http_port
    status, body = _status(f"http://127.0.0.1:{port}/v1/nowhere")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == "not_found", body
    with pytest.raises(openai.BadRequestError) as n_too_big:
        client.completions.create(model="tiny-llama", prompt="Hello", n=10_000)
    assert "--" not in n_too_big.value.body["message"] and n_too_big.value.body["code"] == "invalid_value"


@pytest.mark.parametrize(("kwargs", "param", "message"), [
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages",
     "messages[0].role must be one of system, user, assistant, got 'tool'"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens must be at least 1, got 0"),
    ({"top_logprobs": 25, "logprobs": True}, "top_logprobs", "top_logprobs must be at most 20, got 25"),
    ({"top_logprobs": 3}, "top_logprobs", "top_logprobs needs logprobs: true"),
    ({"messages": [{"role": "user", "content": "y" * 3000}]}, "messages",
     "messages has 3004 bytes, more than the server's max_request_bytes=2048 (32 bytes per token of the "
     "server's max_input_tokens=64)"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "stream_options is only allowed with stream: true"),
])
def test_bad_chat_requests_are_400_naming_the_field(client: openai.OpenAI, kwargs: dict, param: str,
                                                    message: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**{"model": "tiny-llama", "messages": USER, **kwargs})
    assert (error.value.body["param"], error.value.body["message"]) == (param, message)


def test_a_valid_request_without_shards_is_503_and_a_wrong_model_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as unavailable:
        client.chat.completions.create(model="tiny-llama", messages=USER)
    assert unavailable.value.status_code == 503
    assert unavailable.value.body["message"] == "the shards are still loading"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="Hello")
    assert missing.value.body["code"] == "model_not_found" and "tiny-llama" in missing.value.body["message"]


def test_a_body_over_the_message_limit_is_413(server: ServerThread) -> None:
    body = json.dumps({"model": "tiny-llama", "prompt": "x" * (17 << 20)}).encode()
    status, answer = _status(f"http://127.0.0.1:{server.server.http_port}/v1/completions", body)
    assert status == 413 and "more than the limit of 16777216" in answer["error"]["message"]


def test_chat_without_a_chat_template_says_so(tmp_path_factory) -> None:
    running = _serve(_tokenizer(tmp_path_factory, llama_style=False), served_model_name="plain")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{running.server.http_port}/v1", api_key="none",
                               max_retries=0)
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="plain", messages=USER)
        assert error.value.body["param"] == "messages"
        assert "no chat template" in error.value.body["message"]
        assert "--chat-template" in error.value.body["message"]
    finally:
        running.stop()


def test_the_http_port_is_a_port_of_its_own(server: ServerThread, tmp_path_factory) -> None:
    taken = server.server.http_port
    with pytest.raises(RuntimeError, match=rf"^port {taken} \(--http-port\) is already in use"):
        _serve(_tokenizer(tmp_path_factory, llama_style=False), http_port=taken)
