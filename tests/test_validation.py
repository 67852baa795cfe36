"""Unit tests for request validation (router/api/validation.py)."""

from __future__ import annotations

import dataclasses

import pytest

from shardline.proto import serving_pb2 as pb
from shardline.router.api.validation import (
    ChatTurn,
    Limits,
    ValidationError,
    ValidRequest,
    chat_turns,
    prompt_text,
    validate,
)

LIMITS = Limits(max_input_tokens=100, max_total_tokens=128, vocab_size=331, default_max_new_tokens=64)


def _tokenize(text: str) -> list[int]:
    """One token per UTF-8 byte: prompt lengths are easy to predict."""
    return list(text.encode("utf-8"))


def _check(request: pb.GenerateRequest, limits: Limits = LIMITS) -> ValidRequest:
    """Both steps, as the server runs them: prompt_text (or chat_turns), tokenize, validate. A
    conversation "renders" as its contents joined by newlines."""
    if request.WhichOneof("input") == "messages":
        rendered = "\n".join(turn.content for turn in chat_turns(request, limits))
        return validate(request, limits, _tokenize(rendered))
    text = prompt_text(request, limits)
    return validate(request, limits, None if text is None else _tokenize(text))


def _chat(*turns: tuple[str, str], **parameters) -> pb.GenerateRequest:
    request = pb.GenerateRequest(parameters=pb.Parameters(**parameters))
    for role, content in turns:
        request.messages.messages.add(role=role, content=content)
    request.messages.SetInParent()
    return request


def test_chat_messages_are_the_third_input() -> None:
    request = _chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "More"))
    assert chat_turns(request, LIMITS) == (ChatTurn("system", "Be brief."), ChatTurn("user", "Hi"),
                                           ChatTurn("assistant", "Hello"), ChatTurn("user", "More"))
    assert _check(request).prompt_len == len("Be brief.\nHi\nHello\nMore")
    assert prompt_text(request, LIMITS) is None


def test_chat_messages_rules() -> None:
    _rejects(_chat(), "messages", "messages is empty")
    _rejects(_chat(("user", "Hi"), ("tool", "42")), "messages",
             "messages[1].role must be one of system, user, assistant, got 'tool'")
    _rejects(_chat(("user", "x" * 3197)), "messages", "messages has 3201 bytes, more than --max-request-bytes=3200 "
                                                     "(32 bytes per token of --max-input-tokens=100)")
    _rejects(_chat(("user", "x" * 101)), "messages", "messages has 101 tokens, more than --max-input-tokens=100")
    _rejects(_chat(("user", "x" * 30), max_new_tokens=600), "parameters.max_new_tokens",
             "messages (30 tokens) + parameters.max_new_tokens (600) = 630 exceeds --max-total-tokens=128")


def _rejects(request: pb.GenerateRequest, field: str, message: str, limits: Limits = LIMITS) -> None:
    with pytest.raises(ValidationError) as info:
        _check(request, limits)
    assert info.value.field == field
    assert str(info.value) == message


def _with(prompt: str = "hello", **parameters) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, parameters=pb.Parameters(**parameters))


def test_full_request_round_trip() -> None:
    request = pb.GenerateRequest(
        prompt_token_ids=pb.PromptTokenIds(ids=[1, 2, 330]),
        parameters=pb.Parameters(
            max_new_tokens=20, temperature=0.5, top_k=40, top_p=0.25, repetition_penalty=1.25,
            seed=2**63 + 5, stop=["\n\n", "END"], ignore_eos=True, logprobs=True,
        ),
        priority=-3,
    )
    wire = pb.GenerateRequest.FromString(request.SerializeToString())
    assert _check(wire) == ValidRequest(
        prompt_token_ids=(1, 2, 330), max_new_tokens=20, temperature=0.5, top_k=40, top_p=0.25,
        repetition_penalty=1.25, seed=2**63 + 5, stop=("\n\n", "END"), ignore_eos=True, logprobs=True,
        priority=-3,
    )


def test_defaults_for_unset_parameters() -> None:
    valid = _check(pb.GenerateRequest(prompt="héllo"))
    assert valid.prompt_token_ids == tuple("héllo".encode())
    assert valid.prompt_len == 6
    assert (valid.max_new_tokens, valid.temperature, valid.top_k, valid.top_p) == (64, 1.0, 0, 1.0)
    assert (valid.repetition_penalty, valid.seed, valid.stop) == (1.0, None, ())
    assert (valid.ignore_eos, valid.logprobs, valid.priority) == (False, False, 0)


def test_default_max_new_tokens_shrinks_to_fit_total() -> None:
    assert _check(_with("x" * 100)).max_new_tokens == 28


def test_default_max_new_tokens_with_no_room_left() -> None:
    limits = dataclasses.replace(LIMITS, max_input_tokens=128)
    _rejects(
        _with("x" * 128), "prompt",
        "prompt (128 tokens) leaves no room for new tokens within --max-total-tokens=128", limits,
    )


def test_greedy_and_edge_values_are_valid() -> None:
    valid = _check(_with(temperature=0.0, top_p=1.0, top_k=331, max_new_tokens=1, repetition_penalty=0.5))
    assert (valid.temperature, valid.top_p, valid.top_k, valid.max_new_tokens) == (0.0, 1.0, 331, 1)


def test_missing_input() -> None:
    _rejects(pb.GenerateRequest(), "input", "exactly one of prompt, prompt_token_ids or messages is required, got none")


def test_empty_prompt_text() -> None:
    _rejects(pb.GenerateRequest(prompt=""), "prompt", "prompt is empty")


def test_prompt_that_tokenizes_to_nothing() -> None:
    with pytest.raises(ValidationError, match="prompt tokenizes to 0 tokens") as info:
        validate(_with("   "), LIMITS, [])
    assert info.value.field == "prompt"


def test_text_over_the_byte_bound_is_refused_before_tokenizing() -> None:
    """The default bound is 32 bytes per token of --max-input-tokens (100 -> 3200 bytes); the text
    is refused by `prompt_text`, the step before any tokenizer runs."""
    assert prompt_text(_with("x" * 3200), LIMITS) == "x" * 3200
    with pytest.raises(ValidationError) as info:
        prompt_text(_with("x" * 3201), LIMITS)
    assert info.value.field == "prompt"
    assert str(info.value) == ("prompt has 3201 bytes, more than --max-request-bytes=3200 "
                               "(32 bytes per token of --max-input-tokens=100)")
    with pytest.raises(ValidationError, match="prompt has 4000000 bytes, more than --max-request-bytes=3200"):
        prompt_text(_with("x" * 4_000_000), LIMITS)


def test_byte_bound_counts_utf8_bytes_and_takes_an_explicit_limit() -> None:
    limits = dataclasses.replace(LIMITS, max_request_bytes=10)
    assert prompt_text(_with("日本語"), limits) == "日本語"  # 9 bytes
    _rejects(_with("日本語x"), "prompt", "prompt has 10 bytes, more than --max-request-bytes=9",
             dataclasses.replace(LIMITS, max_request_bytes=9))
    _rejects(_with("🙂🙂🙂"), "prompt", "prompt has 12 bytes, more than --max-request-bytes=10", limits)
    assert prompt_text(pb.GenerateRequest(prompt_token_ids=pb.PromptTokenIds(ids=[1])), limits) is None


def test_too_many_token_ids_are_refused_before_the_vocabulary_is_checked() -> None:
    request = pb.GenerateRequest(prompt_token_ids=pb.PromptTokenIds(ids=[99999] * 200_000))
    _rejects(request, "prompt_token_ids", "prompt_token_ids has 200000 tokens, more than --max-input-tokens=100")


def test_empty_prompt_token_ids() -> None:
    request = pb.GenerateRequest(prompt_token_ids=pb.PromptTokenIds())
    _rejects(request, "prompt_token_ids", "prompt_token_ids is empty")


def test_token_id_outside_vocabulary() -> None:
    request = pb.GenerateRequest(prompt_token_ids=pb.PromptTokenIds(ids=[5, 6, 7, 99999, 331]))
    _rejects(request, "prompt_token_ids", "prompt_token_ids[3] = 99999 is outside the vocabulary (size 331)")


def test_prompt_longer_than_max_input_tokens() -> None:
    _rejects(_with("x" * 101), "prompt", "prompt has 101 tokens, more than --max-input-tokens=100")
    request = pb.GenerateRequest(prompt_token_ids=pb.PromptTokenIds(ids=[1] * 700))
    _rejects(request, "prompt_token_ids", "prompt_token_ids has 700 tokens, more than --max-input-tokens=100")


def test_prompt_plus_max_new_tokens_over_total() -> None:
    _rejects(
        _with("x" * 30, max_new_tokens=600), "parameters.max_new_tokens",
        "prompt (30 tokens) + parameters.max_new_tokens (600) = 630 exceeds --max-total-tokens=128",
    )
    assert _check(_with("x" * 30, max_new_tokens=98)).max_new_tokens == 98


def test_max_new_tokens_zero() -> None:
    _rejects(
        _with(max_new_tokens=0), "parameters.max_new_tokens", "parameters.max_new_tokens must be at least 1, got 0"
    )


@pytest.mark.parametrize("value, shown", [(-0.5, "-0.5"), (float("nan"), "nan"), (float("inf"), "inf")])
def test_bad_temperature(value: float, shown: str) -> None:
    _rejects(
        _with(temperature=value), "parameters.temperature",
        f"parameters.temperature must be a finite number >= 0, got {shown}",
    )


@pytest.mark.parametrize("value, shown", [(1.5, "1.5"), (0.0, "0"), (-1.0, "-1"), (float("nan"), "nan")])
def test_bad_top_p(value: float, shown: str) -> None:
    _rejects(_with(top_p=value), "parameters.top_p", f"parameters.top_p must be in (0, 1], got {shown}")


def test_top_k_larger_than_vocabulary() -> None:
    _rejects(
        _with(top_k=332), "parameters.top_k",
        "parameters.top_k must be at most the vocabulary size 331 (0 disables it), got 332",
    )


@pytest.mark.parametrize("value, shown", [(0.0, "0"), (-1.0, "-1"), (float("nan"), "nan"), (float("inf"), "inf")])
def test_bad_repetition_penalty(value: float, shown: str) -> None:
    _rejects(
        _with(repetition_penalty=value), "parameters.repetition_penalty",
        f"parameters.repetition_penalty must be a finite number > 0, got {shown}",
    )


def test_too_many_stop_strings() -> None:
    _rejects(
        _with(stop=[str(i) for i in range(9)]), "parameters.stop",
        "parameters.stop has 9 strings, more than the limit of 8",
    )


def test_empty_stop_string() -> None:
    _rejects(_with(stop=["ok", ""]), "parameters.stop", "parameters.stop[1] is empty")


def test_stop_string_too_long() -> None:
    _rejects(
        _with(stop=["y" * 257]), "parameters.stop",
        "parameters.stop[0] has 257 characters, more than the limit of 256",
    )


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_request_bytes must be at least 0, got -1"):
        Limits(max_input_tokens=10, max_total_tokens=20, vocab_size=10, max_request_bytes=-1)
    with pytest.raises(ValueError, match="vocab_size must be at least 1, got 0"):
        Limits(max_input_tokens=10, max_total_tokens=20, vocab_size=0)
    with pytest.raises(ValueError, match="--max-input-tokens=30 must not exceed --max-total-tokens=20"):
        Limits(max_input_tokens=30, max_total_tokens=20, vocab_size=10)


def test_top_logprobs() -> None:
    assert _check(_with(logprobs=True, top_logprobs=20)).top_logprobs == 20
    assert _check(_with()).top_logprobs == 0
    _rejects(_with(logprobs=True, top_logprobs=21), "parameters.top_logprobs",
             "parameters.top_logprobs must be at most 20, got 21")
    _rejects(_with(top_logprobs=3), "parameters.top_logprobs", "parameters.top_logprobs needs parameters.logprobs")
