"""shardline.proto"""
