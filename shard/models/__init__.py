"""shardline.shard.models"""
