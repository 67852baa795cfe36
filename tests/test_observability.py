"""Observability end to end: Prometheus metrics change with traffic, request ids reach the logs of
the router and the shards, and `shardline bench` (served and --engine) reports every field."""

from __future__ import annotations

import json
import urllib.request

import pytest
from router_harness import launch_args, launched

from shardline.client import Client
from shardline.common.bench_stats import Result, summarize
from shardline.client.cli import main as cli_main

pytestmark = pytest.mark.slow
REPORT_FIELDS = {"requests", "completed", "failures", "errors", "duration_s", "prompt_tokens", "output_tokens",
                 "request_throughput", "output_throughput", "ttft_s", "tpot_s", "itl_s", "e2e_s", "mode"}
STAT_FIELDS = {"mean", "p50", "p90", "p99"}


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint_factory):
    model = checkpoint_factory(arch="llama", num_layers=2)
    with launched(tmp_path_factory.mktemp("observability"), *launch_args(tp=2), "--log-level", "info",
                  model=model, metrics=True) as srv:
        yield srv


def test_metrics_present_and_changing(server):
    before = scrape(server.metrics_url)
    for name in ("shardline_requests_waiting", "shardline_requests_running", "shardline_kv_tokens_used",
                 "shardline_kv_tokens_capacity", "shardline_shard_restarts_total"):
        assert name in before, name
    assert before["shardline_kv_tokens_capacity"] > 0
    with Client(server.target) as client:
        result = client.generate(prompt_token_ids=[5, 6, 7, 8], max_new_tokens=6, temperature=0, ignore_eos=True)
    after = scrape(server.metrics_url)
    assert after["shardline_generated_tokens_total"] - before.get("shardline_generated_tokens_total", 0) == 6
    assert after["shardline_prompt_tokens_total"] - before.get("shardline_prompt_tokens_total", 0) == 4
    assert after['shardline_requests_finished_total{finish_reason="length"}'] >= 1
    assert after["shardline_time_to_first_token_seconds_count"] > before.get(
        "shardline_time_to_first_token_seconds_count", 0)
    assert after['shardline_step_duration_seconds_count{kind="decode"}'] >= 5
    assert after["shardline_inter_token_latency_seconds_count"] >= 5
    assert after["shardline_request_duration_seconds_count"] >= 1
    assert len(result.token_ids) == 6


def test_request_id_in_router_and_shard_logs(server):
    with Client(server.target) as client:
        result = client.generate(prompt_token_ids=[9, 10, 11], max_new_tokens=3, temperature=0, ignore_eos=True)
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    summary = [x for x in lines if x.get("event") == "request" and x.get("request_id") == result.request_id]
    assert len(summary) == 1, f"no summary line for {result.request_id}"
    s = summary[0]
    assert (s["prompt_tokens"], s["generated_tokens"], s["finish_reason"]) == (3, 3, "length")
    for key in ("queue_s", "ttft_s", "total_s"):
        assert s[key] is not None and s[key] >= 0, key
    prefill_ranks = {x["rank"] for x in lines if x.get("event") == "step" and result.request_id in x["request_ids"]}
    assert prefill_ranks == {0, 1}, "each shard's line for the step that started it carries the request id and rank"


def test_bench_served_writes_every_field(server, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli_main(["bench", "--target", server.target, "--num-requests", "6", "--input-len", "4", "8",
                     "--output-len", "3", "5", "--concurrency", "3", "--request-rate", "50", "--json", str(out),
                     "--no-progress"])
    report = json.loads(out.read_text())
    assert code == 0 and REPORT_FIELDS <= report.keys()
    assert report["completed"] == 6 and report["failures"] == 0 and report["mode"] == "served"
    assert 6 * 3 <= report["output_tokens"] <= 6 * 5
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert STAT_FIELDS <= report[key].keys() and report[key]["p99"] >= report[key]["p50"] > 0, key
    assert "output throughput" in capsys.readouterr().out


def test_bench_prefix_len_shares_a_prefix_that_the_server_caches(server, tmp_path):
    out = tmp_path / "prefix.json"
    code = cli_main(["bench", "--target", server.target, "--num-requests", "4", "--input-len", "2", "3",
                     "--prefix-len", "40", "--output-len", "2", "2", "--concurrency", "1", "--json", str(out),
                     "--no-progress", "--seed", "3"])
    report = json.loads(out.read_text())
    assert code == 0 and report["completed"] == 4
    assert report["prompt_tokens"] >= 4 * 42
    assert report["cached_prompt_tokens"] >= 3 * 32, "requests after the first reuse the shared prefix's blocks"


def test_bench_engine_mode(checkpoint_factory, tmp_path):
    out = tmp_path / "engine.json"
    code = cli_main(["bench", "--engine", "--model", str(checkpoint_factory(arch="llama", num_layers=2)),
                     "--num-requests", "5", "--input-len", "3", "9", "--output-len", "2", "6",
                     "--concurrency", "2", "--json", str(out), "--no-progress"])
    report = json.loads(out.read_text())
    assert code == 0 and report["mode"] == "engine" and report["completed"] == 5
    assert REPORT_FIELDS <= report.keys()


def test_summary_statistics():
    results = [Result(4, [0.1, 0.2, 0.4]), Result(2, [0.3, 0.35]), Result(1, [], error="UNAVAILABLE: x")]
    report = summarize(results, 2.0)
    assert (report["completed"], report["failures"], report["output_tokens"]) == (2, 1, 5)
    assert report["output_throughput"] == 2.5
    assert report["ttft_s"]["mean"] == pytest.approx(0.2)
    assert sorted(report["errors"]) == ["UNAVAILABLE: x"]
    assert report["tpot_s"]["mean"] == pytest.approx(((0.4 - 0.1) / 2 + 0.05) / 2)
