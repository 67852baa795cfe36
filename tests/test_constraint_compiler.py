"""The router's constraint compiler on its own: the time bound, the cache, the messages.

A grammar that takes longer than --grammar-timeout to compile is refused (the compile goes on in
its worker thread, never on the event loop); a constraint compiled once is a cache hit after.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client import CollectorRegistry

from shardline.proto import serving_pb2 as pb
from shardline.router.api.constraints import ConstraintCompiler
from shardline.router.api.validation import ValidationError


@pytest.fixture(scope="module")
def tokenizer(checkpoint_factory):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(checkpoint_factory(arch="llama", num_layers=1)))


def compile_with(compiler: ConstraintCompiler, constraint: pb.Constraint) -> str:
    return asyncio.run(compiler.compile(constraint))


def test_a_compile_past_the_time_bound_is_refused(tokenizer):
    compiler = ConstraintCompiler(tokenizer, 331, frozenset({1}), CollectorRegistry(), timeout=1e-4)
    big = pb.Constraint(choice=pb.Choices(choices=[f"option {i} of many" for i in range(2000)]))
    with pytest.raises(ValidationError, match=r"took longer than --grammar-timeout=0.0001s"):
        compile_with(compiler, big)
    compiler.close()


def test_cache_hits_and_the_grammar_is_the_same(tokenizer):
    registry = CollectorRegistry()
    compiler = ConstraintCompiler(tokenizer, 331, frozenset({1}), registry)
    schema = pb.Constraint(json_schema=json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
    first, second = compile_with(compiler, schema), compile_with(compiler, schema)
    assert first == second and first
    assert registry.get_sample_value("shardline_grammar_cache_lookups_total", {"result": "miss"}) == 1
    assert registry.get_sample_value("shardline_grammar_cache_lookups_total", {"result": "hit"}) == 1
    assert compile_with(compiler, pb.Constraint()) == ""
    compiler.close()


@pytest.mark.parametrize("constraint, says", [
    (pb.Constraint(json_schema="[1, 2]"), "a JSON schema is an object or a boolean"),
    (pb.Constraint(json_schema='{"type": "object", "properties": {"a": {"$ref": "#/nope"}}}'), "nope"),
    (pb.Constraint(choice=pb.Choices(choices=["a", ""])), "empty string"),
    (pb.Constraint(regex="a{2,1}"), "constraint.regex is invalid"),
])
def test_refusals_name_the_field_and_the_problem(tokenizer, constraint, says):
    compiler = ConstraintCompiler(tokenizer, 331, frozenset({1}), CollectorRegistry())
    with pytest.raises(ValidationError, match=says) as caught:
        compile_with(compiler, constraint)
    assert caught.value.field.startswith("constraint.")
    compiler.close()
