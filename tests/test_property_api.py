"""Property test of the public API against a real `shardline launch --tp 2`: no request, however odd,
restarts the shard group or ends with anything but OK or INVALID_ARGUMENT.

Hypothesis draws parameter sets across the documented ranges and beyond them (invalid values too),
prompts of unusual text and of token ids in and out of the vocabulary, and runs each example's
requests concurrently with a long stream, mixing max_new_tokens=1 requests and stop strings in. At
the end the group has never restarted and a greedy request still equals transformers.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from checkpoints import reference_generate
from router_harness import launch_args, launched
from shardline.proto import serving_pb2 as pb
from shardline.proto import serving_pb2_grpc

pytestmark = pytest.mark.slow
VOCAB = 331
ODD_FLOATS = [0.0, 1e-40, 1e-8, 0.5, 1.0, 3.0, 1e30, -1.0, math.inf, -math.inf, math.nan]


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    return checkpoint_factory(arch="llama", num_layers=2, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def stub(tmp_path_factory, model):
    with launched(tmp_path_factory.mktemp("prop"), *launch_args(tp=2), model=model, expect_shards=2) as server:
        with grpc.insecure_channel(server.target) as channel:
            yield serving_pb2_grpc.GenerationStub(channel)


def maybe(strategy):
    return st.one_of(st.none(), strategy)


parameters = st.fixed_dictionaries({}, optional={
    "temperature": st.one_of(st.sampled_from(ODD_FLOATS), st.floats(0, 5)),
    "top_k": st.one_of(st.sampled_from([0, 1, 2, VOCAB, VOCAB + 1, 2**32 - 1]), st.integers(0, 400)),
    "top_p": st.one_of(st.sampled_from([1e-9, 0.01, 0.999, 1.0, 0.0, 1.5, math.nan]), st.floats(0, 1)),
    "repetition_penalty": st.sampled_from([1e-30, 1e-3, 0.5, 1.0, 2.0, 1e30, 0.0, -1.0, math.inf]),
    "seed": st.integers(0, 2**64 - 1),
    "max_new_tokens": st.one_of(st.sampled_from([0, 1, 1, 2, 159, 160, 10**6]), st.integers(1, 40)),
    "stop": st.lists(st.text(max_size=6), max_size=3),
    "ignore_eos": st.booleans(),
    "logprobs": st.booleans(),
})
prompts = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=80),
    st.sampled_from(["\x00\x01", "\ufffd\ufeff", "🙂" * 30, "<s>hello", "<s><s></s>", " " * 50, "a\u0301" * 9]),
    st.lists(st.integers(0, VOCAB + 3), max_size=70),
)
requests = st.lists(st.tuples(prompts, parameters, st.integers(-2**31, 2**31 - 1)), min_size=1, max_size=3)


def to_pb(prompt, params: dict, priority: int) -> pb.GenerateRequest:
    request = pb.GenerateRequest(priority=priority, parameters=pb.Parameters(**params))
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.ids.extend(prompt)
    return request


def outcome(stub, request: pb.GenerateRequest, stream: bool) -> grpc.StatusCode:
    try:
        if stream:
            for _ in stub.GenerateStream(request, timeout=120):
                pass
        else:
            stub.Generate(request, timeout=120)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


LONG = pb.GenerateRequest(prompt_token_ids=pb.PromptTokenIds(ids=[5, 6, 7]),
                          parameters=pb.Parameters(max_new_tokens=60, temperature=0.7, seed=1))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=requests)
@example(batch=[("The value of", {"temperature": 1e-40}, 0), ([5, 6], {"max_new_tokens": 1}, 0)])
@example(batch=[([7], {"top_p": 1e-9, "temperature": 1e30, "repetition_penalty": 1e-30, "top_k": 2**32 - 1,
                       "seed": 2**64 - 1}, 5), ([8], {"max_new_tokens": 1, "stop": ["a", ""]}, 0)])
def test_every_request_is_served_or_refused_alone(stub, batch):
    with ThreadPoolExecutor(max_workers=len(batch) + 1) as pool:
        long = pool.submit(outcome, stub, LONG, True)
        codes = list(pool.map(lambda i: outcome(stub, to_pb(*batch[i]), i % 2 == 0), range(len(batch))))
        assert long.result() == grpc.StatusCode.OK
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}, codes
    assert stub.Info(pb.InfoRequest(), timeout=10).restarts == 0


def test_after_the_storm_greedy_still_equals_transformers(stub, model):
    """Runs after the property test on the same server (file order)."""
    prompt = [3, 17, 99, 250, 8]
    reply = stub.Generate(pb.GenerateRequest(prompt_token_ids=pb.PromptTokenIds(ids=prompt), parameters=pb.Parameters(
        max_new_tokens=24, temperature=0, ignore_eos=True)), timeout=60)
    assert list(reply.token_ids) == reference_generate(model, [prompt], 24)[0]
    assert stub.Info(pb.InfoRequest(), timeout=10).restarts == 0
