"""shardline.shard"""
