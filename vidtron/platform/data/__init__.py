"""Data: generated clips, webdataset shards, deterministic global-batch sampling."""
