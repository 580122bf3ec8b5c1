"""Test helpers shipped with the package (multi-rank runs on gloo)."""
