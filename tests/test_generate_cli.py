"""Tests of the `shardline generate` subcommand against the fake router in fake_router.py."""

from __future__ import annotations

import argparse
import json

import pytest
from fake_router import FAILURES, FakeGeneration, Served, fake, served  # noqa: F401 (fixtures)
from shardline.client import generate_cli

# ---- the `shardline generate` subcommand ------------------------------------------------------

def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    generate_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["generate", *argv])


def test_cli_streams_text_then_summary(served: Served, fake: FakeGeneration, capsys: pytest.CaptureFixture) -> None:
    args = _parse("--target", served.target, "hello world", "--max-new-tokens", "3", "--stop", "x", "--stop", "y",
                  "--temperature", "0", "--seed", "5", "--priority", "2")
    assert args.run(args) == 0
    out, err = capsys.readouterr()
    assert out == "t0 t1 t2 \n"
    assert "finish=stop" in err and "tokens=2+3" in err and "id=req-1" in err
    sent = fake.requests[-1]
    assert (list(sent.parameters.stop), sent.parameters.seed, sent.priority) == (["x", "y"], 5, 2)


def test_cli_sends_no_parameter_it_was_not_given(served: Served, fake: FakeGeneration,
                                                 capsys: pytest.CaptureFixture) -> None:
    """Without --max-new-tokens the router's --default-max-new-tokens applies (the fake's is 64)."""
    args = _parse("--target", served.target, "hello world")
    assert args.run(args) == 0
    assert fake.requests[-1].parameters.ListFields() == []
    assert "tokens=2+64" in capsys.readouterr().err


def test_cli_refuses_a_negative_seed_as_an_invalid_request(served: Served, fake: FakeGeneration,
                                                           capsys: pytest.CaptureFixture) -> None:
    args = _parse("--target", served.target, "hello world", "--seed", "-1")
    assert args.run(args) == 2
    assert capsys.readouterr().err == "error: INVALID_ARGUMENT: parameters.seed must be at least 0, got -1\n"
    assert fake.requests == []


def test_cli_chat_sends_messages(served: Served, fake: FakeGeneration, capsys: pytest.CaptureFixture) -> None:
    args = _parse("--target", served.target, "hello world", "--chat", "--system", "Be brief.", "--max-new-tokens", "2")
    assert args.run(args) == 0
    assert capsys.readouterr().out == "t0 t1 \n"
    sent = fake.requests[-1]
    assert sent.WhichOneof("input") == "messages"
    assert [(m.role, m.content) for m in sent.messages.messages] == [("system", "Be brief."), ("user", "hello world")]
    args = _parse("--target", served.target, "hello", "--system", "Be brief.")
    assert args.run(args) == 2 and "--system needs --chat" in capsys.readouterr().err


def test_cli_json(served: Served, fake: FakeGeneration, capsys: pytest.CaptureFixture) -> None:
    args = _parse("--target", served.target, "hello world", "--max-new-tokens", "2", "--json", "--logprobs")
    assert args.run(args) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["text"] == "t0 t1 " and payload["logprobs"] == [0.0, -0.5]
    assert payload["finish_reason"] == "length" and payload["completion_tokens"] == 2


@pytest.mark.parametrize(("prompt", "status"), [("invalid", 2), ("overloaded", 1)])
def test_cli_errors(served: Served, fake: FakeGeneration, capsys: pytest.CaptureFixture, prompt: str,
                    status: int) -> None:
    args = _parse("--target", served.target, prompt)
    assert args.run(args) == status
    code, message = FAILURES[prompt]
    assert capsys.readouterr().err == f"error: {code.name}: {message}\n"


def test_cli_target_from_env_and_help_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDLINE_TARGET", "unix:///run/router.sock")
    parser = argparse.ArgumentParser()
    sub = generate_cli.add_parser(parser.add_subparsers())
    assert parser.parse_args(["generate", "hi"]).target == "unix:///run/router.sock"
    assert issubclass(sub.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    assert all(action.help for action in sub._actions)
