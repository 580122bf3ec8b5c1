"""Buckets and the bucketed stream: assignment, epochs as permutations, resharding 2 -> 4 DP mid-epoch.

The plan never decodes, so these shards hold placeholder media and JSON that states each sample's shape.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from vidtron.errors import ConfigError
from vidtron.platform.config import BucketConfig, DataConfig
from vidtron.platform.data.buckets import Bucket, assign_bucket, resolve_buckets
from vidtron.platform.data.index import write_tar
from vidtron.platform.data.loader import BucketLoader
from vidtron.testing.multirank import run_ranks

SHAPES = [(17, 64, 64), (9, 64, 64), (9, 48, 80), (5, 48, 80), (13, 80, 48), (1, 64, 64), (3, 64, 64)]
BUCKETS = [
    BucketConfig(9, 64, 64, 4),
    BucketConfig(5, 48, 80, 3),
    BucketConfig(9, 80, 48, 5),
    BucketConfig(1, 64, 64, 6),
]


def _write_plan_data(root, n: int = 70, shapes=SHAPES) -> None:
    """n samples cycling through shapes, 3 shards; (3, 64, 64) fits no bucket (too short for 5 or 9 frames)."""
    root.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        f, h, w = shapes[i % len(shapes)]
        meta = {"caption": f"clip {i}", "frames": f, "height": h, "width": w}
        samples.append((f"{i:05d}", {"mp4": b"not decoded here", "json": json.dumps(meta).encode()}))
    for s in range(3):
        write_tar(root / f"shard-{s}.tar", samples[s::3])


@pytest.fixture(scope="module")
def plan_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    _write_plan_data(root)
    return root


def _loader(root, seed=0, image_ratio=0.0, buckets=BUCKETS) -> BucketLoader:
    cfg = DataConfig(root=str(root), format="video", buckets=list(buckets), image_ratio=image_ratio)
    return BucketLoader(cfg, seed)


def _seen(loader: BucketLoader, start: int, stop: int, dp: int) -> list:
    """Items (not padding) every rank of a dp-way layout trains on for batches [start, stop)."""
    out = []
    for cursor in range(start, stop):
        shapes = set()
        for r in range(dp):
            lb = loader.local_batch(cursor, r, dp)
            shapes.add((lb.bucket.name, len(lb.items)))
            out += [it for it, w in zip(lb.items, lb.weight.tolist()) if w > 0]
        assert len(shapes) == 1  # one bucket and one row count for every rank of the step
    return out


def test_assign_bucket_prefers_aspect_then_duration():
    b = [Bucket(9, 64, 64, 1), Bucket(17, 64, 64, 1), Bucket(5, 48, 80, 1), Bucket(1, 64, 64, 1), Bucket(1, 48, 80, 1)]
    assert assign_bucket(17, 64, 64, b) == 1  # longest that fits
    assert assign_bucket(12, 64, 64, b) == 0  # too short for 17
    assert assign_bucket(12, 64, 64, b, interval=2) == 2  # 9 frames every 2nd need 17: the nearest aspect that fits
    assert assign_bucket(33, 64, 64, b, interval=2) == 1
    assert assign_bucket(9, 96, 160, b) == 2  # 3:5 aspect
    assert assign_bucket(1, 480, 800, b) == 4 and assign_bucket(1, 64, 70, b) == 3  # images go to image buckets
    assert assign_bucket(4, 64, 64, b) is None


def test_token_budget_derives_batches_and_bad_configs_fail():
    cfg = DataConfig(
        format="video",
        buckets=[BucketConfig(9, 64, 64), BucketConfig(1, 64, 64), BucketConfig(17, 64, 64, 2)],
        bucket_tokens=1024,
    )
    got = resolve_buckets(cfg)
    assert [(b.name, b.tokens(), b.batch) for b in got] == [
        ("9x64x64", 48, 21),
        ("1x64x64", 16, 64),
        ("17x64x64", 80, 2),
    ]
    with pytest.raises(ConfigError, match="data.bucket_tokens"):
        DataConfig(format="video", buckets=[BucketConfig(9, 64, 64)])
    with pytest.raises(ConfigError, match="data.format"):
        DataConfig(buckets=[BucketConfig(9, 64, 64, 4)])
    with pytest.raises(ConfigError, match="frames"):
        BucketConfig(8, 64, 64, 1)


def test_epoch_is_a_permutation_of_bucketed_samples(plan_root):
    loader = _loader(plan_root)
    assert loader.skipped == {"fits no bucket": 10}  # the (3, 64, 64) clips
    plan = loader.plan
    for epoch in (0, 1):
        batches = plan.epoch(epoch)
        ids = [it.sample for b in batches for it in b.items]
        assert sorted(ids) == sorted(it.sample for items in plan.groups.values() for it in items)  # each once
        assert all(len(b.items) <= loader.buckets[b.bucket].batch for b in batches)
        bucket_of = {it.sample: k for k, items in plan.groups.items() for it in items}
        assert all(bucket_of[it.sample] == b.bucket for b in batches for it in b.items)  # one bucket per batch
    assert [b.items for b in plan.epoch(0)] != [b.items for b in plan.epoch(1)]  # reshuffled per epoch
    again = _loader(plan_root)
    assert [b.items for b in again.plan.epoch(0)] == [b.items for b in plan.epoch(0)]  # same seed, same stream
    assert [b.items for b in _loader(plan_root, seed=1).plan.epoch(0)] != [b.items for b in plan.epoch(0)]


@pytest.mark.parametrize("dps", [(2, 4), (4, 2), (1, 3)])
def test_resharding_mid_epoch_sees_each_sample_once(plan_root, dps):
    """dp=a for the first batches, then a resume at the same cursor with dp=b: exactly one epoch."""
    loader = _loader(plan_root)
    n = loader.plan.batches_per_epoch
    cut = n // 2
    seen = _seen(loader, 0, cut, dps[0]) + _seen(_loader(plan_root), cut, n, dps[1])  # a fresh loader resumes
    counts = Counter(it.sample for it in seen)
    expected = {it.sample for items in loader.plan.groups.values() for it in items}
    assert set(counts) == expected and set(counts.values()) == {1}
    assert len(seen) == 60  # 70 samples, 10 fit no bucket


def test_images_are_mixed_in_at_image_ratio(plan_root, tmp_path):
    buckets = [b for b in BUCKETS if b.frames > 1] + [BucketConfig(1, 64, 64, 4), BucketConfig(1, 48, 80, 4)]
    loader = _loader(plan_root, image_ratio=0.25, buckets=buckets)
    plan = loader.plan
    batches = plan.epoch(0)
    images = [b for b in batches if plan.buckets[b.bucket].is_image]
    assert abs(len(images) / len(batches) - 0.25) < 0.05
    # the data has 10 real images (1x64x64): they form the image stream; videos still appear once per epoch
    assert all(not it.image for b in images for it in b.items)
    videos = Counter(it.sample for b in batches if not plan.buckets[b.bucket].is_image for it in b.items)
    assert set(videos.values()) == {1} and len(videos) == 50
    with pytest.raises(ConfigError, match="image_ratio"):  # no image bucket to put images in
        _loader(plan_root, image_ratio=0.25, buckets=[b for b in BUCKETS if b.frames > 1])
    # data without images: single frames of the videos are the images, each video's once per pass
    _write_plan_data(tmp_path, n=48, shapes=[s for s in SHAPES if s[0] > 1])
    loader = _loader(tmp_path, image_ratio=0.5, buckets=[b for b in buckets if b.frames > 1] + buckets[-1:])
    pool = [it for items in loader.plan.image_pool.values() for it in items]
    assert (
        pool and all(it.image for it in pool) and all(loader.plan.buckets[k].is_image for k in loader.plan.image_pool)
    )


def _rank_items(root, start: int, stop: int) -> list:
    """On a real gloo rank: this rank's sample ids per step; checks all ranks agree on each step's bucket."""
    import torch.distributed as dist

    loader = _loader(root)
    out = []
    for cursor in range(start, stop):
        lb = loader.local_batch(cursor, dist.get_rank(), dist.get_world_size())
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, (lb.bucket.name, len(lb.items)))
        assert len(set(names)) == 1
        out.append([it.sample for it, w in zip(lb.items, lb.weight.tolist()) if w > 0])
    return out


@pytest.mark.slow  # ~30 s on 2 shared cores: 6 spawned processes
def test_resharding_on_real_processes_2_then_4(plan_root):
    n = _loader(plan_root).plan.batches_per_epoch
    cut = n // 2
    first = run_ranks(_rank_items, 2, args=(plan_root, 0, cut))
    second = run_ranks(_rank_items, 4, args=(plan_root, cut, n))
    ids = [i for rank in first + second for step in rank for i in step]
    assert len(ids) == len(set(ids)) == 60
