"""Checkpoint loading never runs arbitrary pickles; manifests catch changed files."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from vidtron.platform.checkpoint import SafeFileSystemReader, latest_valid_checkpoint, save_checkpoint, verify
from vidtron.platform.distributed import DistContext
from vidtron.platform.errors import DataError

CTX = DistContext(0, 1, 0, torch.device("cpu"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _save(tmp_path):
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    return save_checkpoint(tmp_path, 1, model, opt, {"data": {"cursor": 0}}, CTX)


def test_metadata_with_foreign_classes_is_refused(tmp_path):
    path = _save(tmp_path)
    (path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(DataError, match="not allowed"):
        SafeFileSystemReader(str(path)).read_metadata()


def test_manifest_catches_changed_and_missing_files(tmp_path):
    path = _save(tmp_path)
    assert verify(path) is None
    (path / ".metadata").write_bytes((path / ".metadata").read_bytes() + b"x")
    assert ".metadata fails its sha256 check" == verify(path)
    with pytest.warns(UserWarning, match="damaged"):
        assert latest_valid_checkpoint(tmp_path, CTX) is None
    next(path.glob("*.distcp")).unlink()
    assert "missing" in verify(path) or "sha256" in verify(path)
