"""`python -m shardline.shard`: the shard's own entry point (what `shardline launch` and shard nodes
start), so a shard process imports neither the SDK nor the router."""

import sys

from shardline.shard.cli import main

sys.exit(main())
