"""Metrics by tenant, on the router's registry (prefix `shardline_tenant_`).

Counters are bumped by the front door (router/api/admission.py) and the gates; the admitted and
waiting gauges are read from the batcher at scrape time, so they can never drift from it.
Tenants are the names of --api-key-file (`anonymous` without one): a bounded label set.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from shardline.router.metrics import LATENCY_BUCKETS


class _Admitted:
    """Collector: requests admitted (running + waiting) and waiting, by tenant."""

    def __init__(self, batcher: Callable[[], object]) -> None:
        self.batcher = batcher

    def collect(self):
        admitted = GaugeMetricFamily("shardline_tenant_requests_admitted", "Requests admitted (running + "
                                     "waiting), by tenant", labels=["tenant"])
        waiting = GaugeMetricFamily("shardline_tenant_requests_waiting", "Requests waiting to be prefilled, "
                                    "by tenant", labels=["tenant"])
        batcher = self.batcher()
        if batcher is not None:
            requests = list(batcher.admitted)  # one C-level copy: safe from the scrape thread
            queued = [r for r in requests if r in batcher.queue]
            for family, group in ((admitted, requests), (waiting, queued)):
                for tenant, count in sorted(Tally(r.tenant for r in group).items()):
                    family.add_metric([tenant], count)
        yield admitted
        yield waiting


class TenantMetrics:
    def __init__(self, registry: CollectorRegistry, batcher: Callable[[], object]) -> None:
        r = registry
        self.received = Counter("shardline_tenant_requests_received", "Generation requests admitted, by tenant "
                                "and API", ["tenant", "api"], registry=r)
        self.refused = Counter("shardline_tenant_requests_refused", "Requests refused at admission, by tenant "
                               "and status code (RESOURCE_EXHAUSTED: a cap was reached)", ["tenant", "code"],
                               registry=r)
        self.generated = Counter("shardline_tenant_generated_tokens", "Tokens streamed, by tenant", ["tenant"],
                                 registry=r)
        self.queue_time = Histogram("shardline_tenant_request_queue_seconds", "Arrival to prefill, by tenant",
                                    ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        self.unauthenticated = Counter("shardline_unauthenticated_requests", "Calls refused for a missing or "
                                       "wrong API key, by API (grpc, http)", ["api"], registry=r)
        r.register(_Admitted(batcher))

    def ended(self, req) -> None:
        """Counts a request that left its caller: its tokens and its time in the queue."""
        self.generated.labels(req.tenant).inc(len(req.token_ids))
        if req.prefilled_at is not None:
            self.queue_time.labels(req.tenant).observe(req.prefilled_at - req.created)
