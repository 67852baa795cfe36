"""End to end through `shardline launch` with no --model: the bundled demo model (a 3M-parameter
Llama trained on CPython's pydoc topics) served by TP=1 and by TP=2, and the queue's priority
order, visible on the TP=1 server whose --max-batch-size 1 makes every other request wait.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from checkpoints import reference_generate
from router_harness import launched
from shardline.client import AsyncClient, Client, DeadlineExceededError
from shardline.demo import model_dir
from shardline.demo.corpus import real_word_fraction

pytestmark = pytest.mark.slow

# --kv-cache-tokens: the default takes a share of free memory, far more than these tests need.
DEMO_ARGS = ("--kv-cache-tokens", "16384", "--max-input-tokens", "256", "--max-batch-prefill-tokens", "512")
PROMPTS = ("The function", "A class definition", "The return statement", "import")


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    with launched(tmp_path_factory.mktemp("demo"), *DEMO_ARGS, "--max-batch-size", "1",
                  expect_shards=1, metrics=True) as server:
        yield server


@pytest.fixture(scope="module")
def demo_tp2_server(tmp_path_factory):
    with launched(tmp_path_factory.mktemp("demo_tp2"), *DEMO_ARGS, "--tp", "2", expect_shards=2) as server:
        yield server


def greedy_ids(target: str, prompt: str, n: int = 40) -> list[int]:
    with Client(target) as client:
        return client.generate(prompt, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids


def test_launch_without_model_serves_the_demo_model(demo_server):
    with Client(demo_server.target) as client:
        info = client.info()
        result = client.generate("The function", max_new_tokens=40, temperature=0, ignore_eos=True)
    assert info.model == str(model_dir().resolve())
    assert (info.model_type, info.tp_size, info.pp_size) == ("llama", 1, 1)
    # Its positions (1024) cut the default --max-total-tokens 2048.
    assert info.max_total_tokens == 1024
    assert result.completion_tokens == 40
    assert real_word_fraction(result.text) >= 0.7, result.text


def test_demo_tp2_gives_the_same_greedy_tokens_as_tp1_and_transformers(demo_server, demo_tp2_server):
    tp1 = [greedy_ids(demo_server.target, p) for p in PROMPTS]
    tp2 = [greedy_ids(demo_tp2_server.target, p) for p in PROMPTS]
    with Client(demo_server.target) as client:
        prompt_ids = [client.tokenize(p) for p in PROMPTS]
    assert tp2 == tp1
    assert tp1 == reference_generate(model_dir(), prompt_ids, 40)
    with Client(demo_tp2_server.target) as client:
        shards = sorted(client.info().shards, key=lambda s: s.rank)
    assert [s.tp_rank for s in shards] == [0, 1] and all(s.parameter_bytes > 0 for s in shards)


async def wait_waiting(server, count: int, timeout: float = 5.0) -> None:
    """Until the router's queue holds `count` requests."""
    deadline = time.monotonic() + timeout
    while await asyncio.to_thread(server.gauge, "shardline_requests_waiting") != count:
        assert time.monotonic() < deadline, f"the queue never held {count} requests"
        await asyncio.sleep(0.01)


def test_priority_then_fifo_when_requests_wait(demo_server):
    """A long request runs alone (--max-batch-size 1); two priority-0 requests and then one of
    priority 5 queue behind it. The priority-5 one is served first, then the others in order."""
    order: list[str] = []

    async def follow(client: AsyncClient, name: str, priority: int) -> None:
        async for _ in client.generate_stream("import", max_new_tokens=3, temperature=0, priority=priority):
            if name not in order:
                order.append(name)

    async def run() -> tuple[float, float]:
        async with AsyncClient(demo_server.target) as client:
            blocker = client.generate_stream("The function", max_new_tokens=600, temperature=0, ignore_eos=True)
            await blocker.__anext__()
            tasks = []
            for count, (name, priority) in enumerate((("low1", 0), ("low2", 0), ("high", 5)), start=1):
                tasks.append(asyncio.create_task(follow(client, name, priority)))
                await wait_waiting(demo_server, count)  # queued, in this arrival order
            all_queued = time.monotonic()
            async for _ in blocker:
                pass
            blocker_done = time.monotonic()
            await asyncio.gather(*tasks)
        return all_queued, blocker_done

    all_queued, blocker_done = asyncio.run(run())
    assert blocker_done > all_queued, "the blocker finished before the queue formed: nothing was ordered"
    assert order == ["high", "low1", "low2"]


def test_a_request_whose_deadline_passes_in_the_queue_is_never_prefilled(demo_server):
    async def run() -> tuple[float, float]:
        async with AsyncClient(demo_server.target, retries=0) as client:
            blocker = client.generate_stream("The function", max_new_tokens=400, temperature=0, ignore_eos=True)
            await blocker.__anext__()
            prefilled = await asyncio.to_thread(demo_server.gauge, "shardline_prompt_tokens_total")
            with pytest.raises(DeadlineExceededError):
                await client.generate("import " * 20, max_new_tokens=4, timeout=0.3)
            await wait_waiting(demo_server, 0)  # its place in the queue is freed with the call
            rest = [c async for c in blocker]
            assert rest[-1].finish_reason == "length"  # the blocker ran on meanwhile
            await asyncio.sleep(0.1)  # a step after the blocker's last token
            return prefilled, await asyncio.to_thread(demo_server.gauge, "shardline_prompt_tokens_total")

    before, after = asyncio.run(run())
    assert after == before, "the expired request was prefilled"
