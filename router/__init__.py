"""shardline.router"""
