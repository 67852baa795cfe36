"""Prometheus metrics of the router, prefix `shardline_`, with the meanings vLLM and TGI users know.

One `Metrics` object per router (its own registry, so tests can run several routers in one
process), exported over HTTP on --metrics-port.
"""

from __future__ import annotations

import errno

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.waiting = Gauge("shardline_requests_waiting", "Requests admitted and waiting to be prefilled", registry=r)
        self.running = Gauge("shardline_requests_running", "Requests being decoded", registry=r)
        self.batch_size = Histogram("shardline_batch_size", "Requests in each decode step",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.kv_used = Gauge("shardline_kv_tokens_used", "KV tokens in the blocks running requests hold (a shared "
                             "block counts once per holder; the prefix cache's own blocks do not count)", registry=r)
        self.kv_capacity = Gauge("shardline_kv_tokens_capacity", "KV tokens the shard group can hold", registry=r)
        self.kv_blocks_used = Gauge("shardline_kv_blocks_used", "KV blocks in use, by requests or by the prefix "
                                    "cache (evictable when no request holds them)", registry=r)
        self.kv_blocks_total = Gauge("shardline_kv_blocks_total", "KV blocks in the shards' pools", registry=r)
        self.prefix_query_tokens = Counter("shardline_prefix_cache_queried_tokens", "Prompt tokens looked up "
                                           "in the prefix cache at admission", registry=r)
        self.prefix_hit_tokens = Counter("shardline_prefix_cache_hit_tokens", "Prompt tokens found in the prefix "
                                         "cache (hit rate = hit / queried)", registry=r)
        self.prefix_cached_blocks = Gauge("shardline_prefix_cache_blocks", "KV blocks held by the prefix cache",
                                          registry=r)
        self.preemptions = Counter("shardline_preemptions", "Running requests sent back to the queue for "
                                   "lack of KV blocks (resumed later by recompute)", registry=r)
        self.ttft = Histogram("shardline_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("shardline_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("shardline_request_duration_seconds", "Arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("shardline_request_queue_seconds", "Arrival to prefill",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("shardline_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("shardline_generated_tokens", "Tokens generated", registry=r)
        self.received = Counter("shardline_requests_received", "Generation requests admitted, by API "
                                "(grpc, or http for the OpenAI-compatible one; n > 1 counts each choice)",
                                ["api"], registry=r)
        self.finished = Counter("shardline_requests_finished", "Requests that ended, by finish reason",
                                ["finish_reason"], registry=r)
        self.errors = Counter("shardline_request_errors", "Requests that ended with an error status, by code",
                              ["code"], registry=r)
        self.restarts = Counter("shardline_shard_restarts", "Restarts of the shard group", registry=r)
        self.spec_proposed = Counter("shardline_speculative_proposed_tokens", "Tokens proposed by "
                                     "--speculative and sent to the shards for verification", registry=r)
        self.spec_accepted = Counter("shardline_speculative_accepted_tokens", "Proposed tokens the shards "
                                     "confirmed (acceptance rate = accepted / proposed)", registry=r)
        self.spec_by_position = Counter("shardline_speculative_accepted_by_position", "Proposed tokens confirmed, "
                                        "by their place in the proposal (1 = first; rate at a place = this over "
                                        "proposed_by_position)", ["position"], registry=r)
        self.spec_proposed_by_position = Counter("shardline_speculative_proposed_by_position", "Tokens proposed, "
                                                 "by their place in the proposal", ["position"], registry=r)
        self.router_cpu = Histogram("shardline_router_step_cpu_seconds", "Router CPU time per step (planning the "
                                    "next step, streaming the last one's tokens)", buckets=LATENCY_BUCKETS, registry=r)
        self.step = Histogram("shardline_step_duration_seconds", "Router-observed duration of a shard step",
                              ["kind"], buckets=LATENCY_BUCKETS, registry=r)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Exports the metrics over HTTP (GET /metrics); a RuntimeError naming --metrics-port when
        the port cannot be bound (taken by another program, say)."""
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            taken = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise RuntimeError(f"port {port} (--metrics-port) {taken} on {host}; choose another --metrics-port, "
                               f"or 0 to turn metrics off") from None
