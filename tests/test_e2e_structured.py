"""End to end: structured output through `shardline launch`, the gRPC SDK and the official `openai` client.

The model has random weights, so a constraint is the only thing that can make its output valid:
every finished output must parse and validate, over many seeds. Bad constraints are refused before
the shards (INVALID_ARGUMENT / 400 naming the problem) and the server keeps serving; free requests
batched with constrained ones get the tokens they get alone.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import grpc
import jsonschema
import pytest

from router_harness import launched
from shardline.client import Client
from shardline.client.errors import InvalidRequestError

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                    "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string", "maxLength": 12},
                                                                          "celsius": {"type": "boolean"}},
                                                           "required": ["city", "celsius"],
                                                           "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
NEW = 160


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_llama):
    args = ("--max-total-tokens", "512", "--max-input-tokens", "128", "--served-model-name", "tiny",
            "--grammar-timeout", "2", "--kv-cache-tokens", "512", "--kv-block-size", "16")
    # a 512-token KV pool: six concurrent constrained requests outgrow it, so they are preempted and resumed
    with launched(tmp_path_factory.mktemp("structured"), *args, model=shared_llama, metrics=True,
                  http=True) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0)


def counter(server, name: str, label: str = "") -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return sum(float(v) for v in re.findall(rf'^{name}(?:{{[^}}]*{label}[^}}]*}})? (\S+)$', text, re.M))


def test_json_schema_outputs_validate_over_seeds(client):
    for seed in range(10):
        got = client.generate("Describe someone:", json_schema=PERSON, max_new_tokens=NEW, seed=seed)
        assert got.finish_reason == "eos", got.text
        jsonschema.validate(json.loads(got.text), PERSON)


def test_any_json_object(client):
    finished = 0
    for seed in range(6):
        got = client.generate("Data:", json_object=True, max_new_tokens=NEW, seed=seed, temperature=0.7)
        if got.finish_reason == "eos":
            assert isinstance(json.loads(got.text), dict)
            finished += 1
        else:
            assert got.text.startswith("{")
    assert finished, "no output finished: nothing was checked"


def test_regex_choice_and_grammar_outputs_match(client):
    for seed in range(5):
        got = client.generate("Code:", regex=r"[A-Z]{2}-[0-9]{3}", max_new_tokens=20, seed=seed)
        assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", got.text) and got.finish_reason == "eos"
        got = client.generate("Pick:", choice=["red", "green", "blue"], max_new_tokens=20, seed=seed)
        assert got.text in ("red", "green", "blue") and got.finish_reason == "eos"
        got = client.generate("Say:", grammar='start: "yes" | "no" ", " NUM\nNUM: /[0-9]{1,3}/',
                              max_new_tokens=20, seed=seed)
        assert re.fullmatch(r"(yes|no, [0-9]{1,3})", got.text), got.text


def test_seeded_sampling_under_a_constraint_is_reproducible(client):
    runs = [client.generate("Again:", json_schema=PERSON, max_new_tokens=NEW, seed=7, temperature=0.9).token_ids
            for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kwargs, says", [
    ({"json_schema": '{"type": 5}'}, "constraint.json_schema is invalid"),
    ({"json_schema": "{not json"}, "not JSON"),
    ({"regex": "(abc"}, "unclosed group"),
    ({"grammar": "start: nothing_here"}, "nothing_here"),
    ({"grammar": "start: " + " | ".join(f'"w{i}"' for i in range(12000))}, "--max-grammar-bytes=65536"),
    ({"choice": []}, "at least one"),
])
def test_bad_constraints_are_refused_and_the_server_keeps_serving(client, kwargs, says):
    start = time.monotonic()
    with pytest.raises(InvalidRequestError, match=re.escape(says)):
        client.generate("x", max_new_tokens=4, **kwargs)
    assert time.monotonic() - start < 2.5  # within --grammar-timeout
    assert client.generate("x", max_new_tokens=3).token_ids


def test_free_requests_batched_with_constrained_ones_get_their_own_tokens(client):
    prompts = ["One two", "Three four five", "Six"]
    alone = [client.generate(p, max_new_tokens=24, temperature=0, ignore_eos=True).token_ids for p in prompts]
    mixed: dict[int, list[int]] = {}

    def free(i: int) -> None:
        mixed[i] = client.generate(prompts[i], max_new_tokens=24, temperature=0, ignore_eos=True).token_ids

    def constrained(seed: int) -> None:
        got = client.generate("JSON:", json_schema=PERSON, max_new_tokens=NEW, seed=seed)
        jsonschema.validate(json.loads(got.text), PERSON)

    threads = [threading.Thread(target=free, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=constrained, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [mixed[i] for i in range(3)] == alone


def test_constrained_requests_through_preemption_stay_exact(server, client):
    """Six seeded constrained requests at once on a 512-token pool: preempted and resumed (their
    matchers rebuilt from the tokens fed again), each gives exactly what it gives alone, valid."""
    schema = {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 12, "maxItems": 14}
    alone = {s: client.generate("List:", json_schema=schema, max_new_tokens=250, seed=s, temperature=0.9).token_ids
             for s in range(6)}
    before = counter(server, "shardline_preemptions_total")
    together: dict[int, object] = {}

    def one(seed: int) -> None:
        together[seed] = client.generate("List:", json_schema=schema, max_new_tokens=250, seed=seed, temperature=0.9)

    threads = [threading.Thread(target=one, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter(server, "shardline_preemptions_total") > before, "nothing was preempted: the test proved nothing"
    for seed, got in together.items():
        assert got.token_ids == alone[seed]
        assert got.finish_reason == "eos"
        jsonschema.validate(json.loads(got.text), schema)


def test_compile_metrics_count_misses_and_hits(server, client):
    schema = {"type": "object", "properties": {"k": {"enum": ["x", "y"]}}, "required": ["k"]}
    misses = counter(server, "shardline_grammar_cache_lookups_total", 'result="miss"')
    hits = counter(server, "shardline_grammar_cache_lookups_total", 'result="hit"')
    for _ in range(3):
        client.generate("k:", json_schema=schema, max_new_tokens=20)
    assert counter(server, "shardline_grammar_cache_lookups_total", 'result="miss"') == misses + 1
    assert counter(server, "shardline_grammar_cache_lookups_total", 'result="hit"') == hits + 2
    assert counter(server, "shardline_grammar_compile_seconds_count") >= 1


def test_openai_response_format_json_schema_and_json_object(openai_client):
    got = openai_client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Who?"}], max_tokens=NEW, seed=3, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    for choice in got.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    got = openai_client.completions.create(model="tiny", prompt="Data:", max_tokens=NEW, seed=1,
                                           extra_body={"response_format": {"type": "json_object"}})
    if got.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(got.choices[0].text), dict)


def test_openai_structured_outputs_extra_body(openai_client):
    got = openai_client.completions.create(model="tiny", prompt="Pick:", max_tokens=10, seed=2,
                                           extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert got.choices[0].text in ("left", "right")
    got = openai_client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "id?"}],
                                                max_tokens=20, extra_body={"structured_outputs": {"regex": r"[0-9]{4}"}})
    assert re.fullmatch(r"[0-9]{4}", got.choices[0].message.content)


def test_openai_bad_schema_is_a_400(openai_client):
    import openai
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": 5}}})
    assert "json_schema is invalid" in caught.value.message


def _arguments_valid(name: str, arguments: str) -> None:
    tool = {"get_weather": WEATHER, "get_time": TIME}[name]
    jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])


def test_openai_named_and_required_tool_calls_validate(openai_client):
    for seed in range(3):
        got = openai_client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=NEW, seed=seed)
        choice = got.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        _arguments_valid(call.function.name, call.function.arguments)
        got = openai_client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Anything?"}], tools=[WEATHER, TIME],
            tool_choice="required", max_tokens=NEW, seed=seed)
        choice = got.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            _arguments_valid(call.function.name, call.function.arguments)


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_openai_streamed_tool_call_deltas_reassemble(openai_client, tool_choice):
    stream = openai_client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER, TIME],
        tool_choice=tool_choice, max_tokens=NEW, seed=5, stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": ""})
            entry["id"] += delta.id or ""
            if delta.function is not None:
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and calls
    for entry in calls.values():
        assert entry["id"].startswith("call_")
        _arguments_valid(entry["name"], entry["arguments"])


def test_grpc_refuses_a_constraint_with_ignore_eos(server):
    from shardline.proto import serving_pb2, serving_pb2_grpc
    with grpc.insecure_channel(server.target) as channel:
        stub = serving_pb2_grpc.GenerationStub(channel)
        request = serving_pb2.GenerateRequest(prompt="x", parameters=serving_pb2.Parameters(ignore_eos=True),
                                              constraint=serving_pb2.Constraint(regex="a+"))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ignore_eos" in caught.value.details()


def test_sdk_chat_with_tools_answers_tool_calls(client):
    for seed in range(3):
        got = client.chat([{"role": "user", "content": "Weather?"}], tools=[WEATHER, TIME], tool_choice="get_weather",
                          max_new_tokens=NEW, seed=seed)
        (call,) = got.tool_calls
        assert call.name == "get_weather"
        _arguments_valid(call.name, call.arguments)
        got = client.chat([{"role": "user", "content": "Any?"}], tools=[WEATHER, TIME], tool_choice="required",
                          parallel_tool_calls=False, max_new_tokens=NEW, seed=seed)
        (call,) = got.tool_calls
        _arguments_valid(call.name, call.arguments)
    plain = client.chat([{"role": "user", "content": "Hi"}], max_new_tokens=3)
    assert plain.tool_calls is None
    with pytest.raises(InvalidRequestError, match="not in tools"):
        client.chat([{"role": "user", "content": "x"}], tools=[WEATHER], tool_choice="nope")
