"""The worst-case steps Warmup runs before the KV pool is sized.

A decode-shaped step of the largest batch (one token per sequence, half of them sampled with a
temperature so the full sampling path runs), then a prefill of the largest step (sequences no
longer than the model allows). Both run on a scratch pool just big enough for them, so the peak
memory of a real step is known before the pool takes the rest.
"""

from __future__ import annotations

from shardline.proto import shard_pb2

WARMUP_ID_BASE = 2**62


def warmup_steps(max_step_tokens: int, max_batch_size: int, block_size: int,
                 max_positions: int) -> tuple[list[shard_pb2.StepRequest], int]:
    """(the steps to run, the blocks of scratch pool they need)."""
    next_block = 0

    def blocks(n_tokens: int) -> list[int]:
        nonlocal next_block
        count = -(-n_tokens // block_size)
        next_block += count
        return list(range(next_block - count, next_block))

    def start(i: int, hot: bool) -> shard_pb2.NewSequence:
        sampling = shard_pb2.SamplingParameters(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.1) \
            if hot else shard_pb2.SamplingParameters()
        return shard_pb2.NewSequence(id=WARMUP_ID_BASE + i, sampling=sampling, prompt_len=1)

    decode_ids = range(max(1, max_batch_size))
    decode = shard_pb2.StepRequest(
        start=[start(i, i % 2 == 1) for i in decode_ids],
        work=[shard_pb2.Work(id=WARMUP_ID_BASE + i, token_ids=[2 + i % 7], new_blocks=blocks(1), sample=True)
              for i in decode_ids])
    per_seq = max(2, min(max_step_tokens, max_positions - 1))
    lengths = [per_seq] * (max_step_tokens // per_seq) + [max_step_tokens % per_seq]
    first = len(decode_ids)
    prefill = shard_pb2.StepRequest(free=[WARMUP_ID_BASE + i for i in decode_ids])
    for i, n in enumerate(x for x in lengths if x > 1):
        prefill.start.append(start(first + i, i == 0))
        prefill.work.append(shard_pb2.Work(id=WARMUP_ID_BASE + first + i, token_ids=[2 + j % 7 for j in range(n)],
                                           new_blocks=blocks(n), sample=True))
    return [decode, prefill], next_block
