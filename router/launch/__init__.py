"""Launching: `shardline launch` and `shardline router`."""
