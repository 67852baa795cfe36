"""The shard group: fan-out client, processes, supervision, NCCL."""
