"""End to end through `shardline launch --speculative ngram`: output identical with and without it.

One server speculates; each request is compared with the same request opted out
(`speculative=False`, which runs plain decodes on the same server) and, greedy, with transformers.
Its KV pool (512 tokens) is smaller than the concurrent test's total, so speculation also meets
preemption and resume; the metrics must show proposals accepted, or the test proved nothing.
"""

from __future__ import annotations

import re
import threading
import urllib.request

import pytest

from checkpoints import random_prompts, reference_generate
from router_harness import launched
from shardline.client import Client

pytestmark = pytest.mark.slow
VOCAB = 331


def looping_prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts that repeat themselves (a passage, then its opening again), as copy-heavy text does."""
    out = []
    for p in random_prompts(n, VOCAB, min_len=10, max_len=16, seed=seed):
        out.append(p + p + p[:3])
    return out


@pytest.fixture(scope="module")
def model(checkpoint_factory):
    return checkpoint_factory(arch="llama", num_layers=2, max_position_embeddings=512, seed=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model):
    args = ("--speculative", "ngram", "--num-speculative-tokens", "4", "--max-total-tokens", "400",
            "--max-input-tokens", "100", "--kv-cache-tokens", "512", "--kv-block-size", "16")
    args += ("--served-model-name", "tiny")
    with launched(tmp_path_factory.mktemp("spec"), *args, model=model, metrics=True, http=True) as server:
        yield server


def counter(server, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_greedy_output_is_transformers_with_proposals_accepted(server, model):
    prompts = looping_prompts(3, seed=1) + random_prompts(2, VOCAB, min_len=5, max_len=9, seed=2)
    expected = reference_generate(model, prompts, 60)
    before = counter(server, "shardline_speculative_accepted_tokens_total")
    with Client(server.target) as client:
        for prompt, want in zip(prompts, expected):
            for speculative in (True, False):
                got = client.generate(prompt_token_ids=prompt, max_new_tokens=60, temperature=0, ignore_eos=True,
                                      speculative=speculative)
                assert got.token_ids == want, f"speculative={speculative}"
    assert counter(server, "shardline_speculative_accepted_tokens_total") > before, "nothing was accepted"


def test_seeded_sampling_is_the_same_with_and_without_speculation(server):
    prompts = looping_prompts(2, seed=4)
    with Client(server.target) as client:
        for prompt in prompts:
            runs = [client.generate(prompt_token_ids=prompt, max_new_tokens=50, temperature=0.7, top_p=0.9,
                                    seed=99, ignore_eos=True, speculative=s).token_ids for s in (True, False, True)]
            assert runs[0] == runs[1] == runs[2]


def test_stop_string_and_max_new_tokens_cut_inside_an_accepted_run(server):
    prompt = looping_prompts(1, seed=1)[0]
    with Client(server.target) as client:
        plain = client.generate(prompt_token_ids=prompt, max_new_tokens=60, temperature=0, ignore_eos=True,
                                speculative=False)
        stop = plain.text[len(plain.text) // 2:len(plain.text) // 2 + 3]
        for n in (1, 2, 7, 33):
            cut = client.generate(prompt_token_ids=prompt, max_new_tokens=n, temperature=0, ignore_eos=True)
            assert cut.token_ids == plain.token_ids[:n]
        stopped = [client.generate(prompt_token_ids=prompt, max_new_tokens=60, temperature=0, ignore_eos=True,
                                   stop=stop, speculative=s) for s in (True, False)]
        streamed = list(client.generate_stream(prompt_token_ids=prompt, max_new_tokens=60, temperature=0,
                                               ignore_eos=True, stop=stop))
    assert stopped[0].text == stopped[1].text == plain.text[:plain.text.index(stop)]
    assert stopped[0].token_ids == stopped[1].token_ids
    assert [c.token_id for c in streamed] == stopped[0].token_ids
    assert "".join(c.text for c in streamed) == stopped[0].text


def test_concurrent_streams_through_preemption_stay_exact(server, model):
    """6 x (~40 + 120) tokens > the 512-token pool: requests are preempted and resumed mid-stream."""
    prompts = looping_prompts(6, seed=7)
    expected = reference_generate(model, prompts, 120)
    before = counter(server, "shardline_preemptions_total")
    out: dict[int, list[int]] = {}
    with Client(server.target) as client:
        def run(i: int) -> None:
            out[i] = [c.token_id for c in client.generate_stream(
                prompt_token_ids=prompts[i], max_new_tokens=120, temperature=0, ignore_eos=True,
                speculative=i % 3 != 2)]
        threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert [out[i] for i in range(6)] == expected
    assert counter(server, "shardline_preemptions_total") > before


def test_openai_extra_body_opts_out_and_streams_the_same_text(server):
    import openai

    client = openai.OpenAI(base_url=server.http_url, api_key="none", max_retries=0, timeout=60)
    prompt = looping_prompts(1, seed=11)[0]
    common = dict(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
    proposed = counter(server, "shardline_speculative_proposed_tokens_total")
    plain = client.completions.create(**common, extra_body={"ignore_eos": True, "speculative": False})
    assert counter(server, "shardline_speculative_proposed_tokens_total") == proposed, "opted out, yet proposed"
    fast = client.completions.create(**common, extra_body={"ignore_eos": True})
    streamed = client.completions.create(**common, stream=True, extra_body={"ignore_eos": True})
    assert fast.choices[0].text == plain.choices[0].text
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text
