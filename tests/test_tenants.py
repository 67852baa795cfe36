"""Tenants' fair share (issue 15): round-robin between tenants among waiting requests of equal
priority (router/scheduling/queue.py), through the real batcher and scheduler against the fake shard group;
--max-concurrent-requests-per-tenant and the priority caps at admission (router/api/admission.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from transformers import AutoTokenizer

from checkpoints import build_tokenizer
from fake_shards import FakeGroup
from shardline.router.api.admission import FrontDoor, Refused
from shardline.router.api.auth import Tenant
from shardline.router.config import RouterConfig
from shardline.router.scheduling.queue import Entry, RequestQueue
from shardline.router.api.security_config import SecurityConfig
from test_batcher import batcher_for, drain, make, settle


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


@dataclass(eq=False)
class Waiting(Entry):
    name: str = ""


def entry(name: str, tenant: str, priority: int = 0) -> Waiting:
    return Waiting(priority=priority, prompt_len=1, max_new_tokens=1, tenant=tenant, name=name)


def drain_queue(queue: RequestQueue) -> list[str]:
    out = []
    while (e := queue.pop()) is not None:
        out.append(e.name)
    return out


# -- the queue ----------------------------------------------------------------------------------------

def test_a_burst_does_not_starve_a_tenant_that_arrives_behind_it() -> None:
    queue: RequestQueue[Waiting] = RequestQueue()
    for i in range(6):
        queue.put(entry(f"a{i}", "A"))
    assert queue.pop().name == "a0"
    for i in range(2):
        queue.put(entry(f"b{i}", "B"))
    queue.put(entry("c0", "C"))
    assert drain_queue(queue) == ["b0", "c0", "a1", "b1", "a2", "a3", "a4", "a5"]


def test_priority_still_comes_first_and_each_tenant_keeps_its_order() -> None:
    queue: RequestQueue[Waiting] = RequestQueue()
    for name, tenant, priority in [("a0", "A", 0), ("a1", "A", 0), ("a2", "A", 5), ("b0", "B", 0),
                                   ("b1", "B", 5), ("b2", "B", 5), ("c0", "C", -1)]:
        queue.put(entry(name, tenant, priority))
    assert drain_queue(queue) == ["a2", "b1", "b2", "a0", "b0", "a1", "c0"]


def test_a_preempted_entry_put_back_keeps_its_place() -> None:
    queue: RequestQueue[Waiting] = RequestQueue()
    a = [entry(f"a{i}", "A") for i in range(3)]
    for e in a:
        queue.put(e)
    b0 = entry("b0", "B")
    queue.put(b0)
    assert [queue.pop().name, queue.pop().name] == ["a0", "b0"]
    queue.put(b0)  # preempted: back at its old place, before the rest of A's burst
    assert drain_queue(queue) == ["b0", "a1", "a2"]


def test_tenants_that_leave_leave_nothing_behind() -> None:
    queue: RequestQueue[Waiting] = RequestQueue()
    for i in range(500):
        e = entry(str(i), f"t{i % 50}", priority=i % 7)
        queue.put(e)
        if i % 3:
            queue.remove(e)
    drain_queue(queue)
    assert not queue._levels and not queue._live


# -- through the batcher --------------------------------------------------------------------------------

def of(tenant: str, req):
    req.tenant = tenant
    return req


def test_the_batcher_starts_a_late_tenant_next_not_after_the_flood(tokenizer) -> None:
    """--max-batch-size 1: A floods 6 requests; B sends one once A's first runs. B starts second
    (FIFO would start it seventh), and every stream is served in full."""
    group = FakeGroup()
    batcher = batcher_for(group, max_batch_size=1)
    flood = [of("A", make(tokenizer, i, 4)) for i in range(1, 7)]
    late = of("B", make(tokenizer, 100, 4))

    async def main() -> list[int]:
        loop = asyncio.create_task(batcher.run(group))
        try:
            for req in flood:
                batcher.submit(req)
            while not group.steps or not group.steps[0].start:
                await asyncio.sleep(0)
            batcher.submit(late)
            results = await asyncio.gather(*(drain(r) for r in [*flood, late]))
            assert all(len(r) == 4 for r in results)
            await settle(batcher, group)
        finally:
            loop.cancel()
        return [s.id for step in group.steps for s in step.start]

    assert asyncio.run(main()) == [1, 100, 2, 3, 4, 5, 6]


# -- admission ------------------------------------------------------------------------------------------

def door_for(tokenizer, **security) -> FrontDoor:
    group = FakeGroup()
    cfg = RouterConfig(model=Path("."), max_concurrent_requests=10, security=SecurityConfig(**security))
    door = FrontDoor(cfg, tokenizer, vocab_size=320)
    door.batcher = batcher_for(group, max_concurrent_requests=10)
    return door


def test_the_per_tenant_cap_refuses_the_flooder_only(tokenizer) -> None:
    door = door_for(tokenizer, max_concurrent_requests_per_tenant=3)
    a, b = Tenant("A"), Tenant("B")
    admitted = [door.admit(make(tokenizer, i, 4).valid, tenant=a)[0] for i in range(3)]
    with pytest.raises(Refused) as refused:
        door.admit(make(tokenizer, 9, 4).valid, tenant=a)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.message == ("tenant 'A' already has 3 requests admitted "
                                     "(--max-concurrent-requests-per-tenant=3)")
    assert [door.admit(make(tokenizer, 10 + i, 4).valid, tenant=b)[0].tenant for i in range(3)] == ["B"] * 3
    door.batcher.cancel(admitted[0])  # one of A's ends: A may send one more
    assert door.admit(make(tokenizer, 20, 4).valid, tenant=a)[0].tenant == "A"
    registry = door.metrics.registry
    assert registry.get_sample_value("shardline_tenant_requests_refused_total",
                                     {"tenant": "A", "code": "RESOURCE_EXHAUSTED"}) == 1
    assert registry.get_sample_value("shardline_tenant_requests_received_total", {"tenant": "B", "api": "grpc"}) == 3
    assert registry.get_sample_value("shardline_tenant_requests_admitted", {"tenant": "A"}) == 3


def test_priority_caps_the_flag_and_a_key_of_its_own(tokenizer) -> None:
    door = door_for(tokenizer, max_priority_per_tenant=3)
    with pytest.raises(Refused) as refused:
        door.admit(make(tokenizer, 1, 4, priority=4).valid, tenant=Tenant("A"))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and refused.value.field == "priority"
    assert refused.value.message == "priority 4 is more than tenant 'A' may ask for (--max-priority-per-tenant=3)"
    assert door.admit(make(tokenizer, 2, 4, priority=3).valid, tenant=Tenant("A"))[0].priority == 3
    assert door.admit(make(tokenizer, 3, 4, priority=9).valid, tenant=Tenant("ops", max_priority=10))
    with pytest.raises(Refused, match=r"tenant 'batch' may ask for \(its max_priority in --api-key-file=-1\)"):
        door.admit(make(tokenizer, 4, 4, priority=0).valid, tenant=Tenant("batch", max_priority=-1))
