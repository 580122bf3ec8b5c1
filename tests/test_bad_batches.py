"""A persistently bad sample cannot loop: after a NaN rollback the batches of the failed window are skipped.

`faults.nan_sample=X` makes every batch holding sample X produce a NaN loss, every time (a corrupt clip, say). With
trainer.max_bad_steps=1 the first such step rolls back to the last checkpoint; the replay moves past that batch
(recorded in events.jsonl with its sample keys, and in the manifest so a restart keeps skipping it). The run ends
at its last step, and it is bitwise the run that was told to skip that batch from the start (trainer.skip_batches):
the rollback restores model, optimizer, RNG and data position, and every draw is keyed by (step, position).
"""

from __future__ import annotations

import json

import torch

from tests.helpers import full_params
from tests.test_parallel_parity import config
from vidtron.platform.distributed import DistContext
from vidtron.platform.trainer import train
from vidtron.recipes.dit_t2v.task import DiTTextToVideo

ONE = DistContext(0, 1, 0, torch.device("cpu"))
STEPS, BATCH = 8, 4


def _run(cfg) -> tuple[list[float], dict]:
    state = train(cfg, DiTTextToVideo(cfg), ONE)
    return state.losses, full_params(state.model)


def test_a_bad_sample_is_skipped_after_rollback_and_the_run_finishes(pad_data, tmp_path):
    common = [f"trainer.steps={STEPS}", f"data.batch_size={BATCH}", "trainer.checkpoint_every=2"]
    probe = config(pad_data, tmp_path / "probe", *common)
    bad_cursor = 4 * BATCH  # the global batch of step 5
    bad_sample = int(DiTTextToVideo(probe).sampler.global_indices(bad_cursor, BATCH)[0])

    run = tmp_path / "bad"
    cfg = config(pad_data, run, *common, f"faults.nan_sample={bad_sample}", "trainer.max_bad_steps=1")
    losses, params = _run(cfg)
    manifest = json.loads((run / "checkpoints" / f"step_{STEPS:06d}" / "manifest.json").read_text())
    skipped = manifest["data"]["skip"]
    assert bad_cursor in skipped
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    skips = [e for e in events if e["event"] == "batches-skipped"]
    assert any(str(bad_sample) in b["samples"] for e in skips for b in e["batches"])
    assert len([e for e in events if e["event"] == "rollback"]) == len(skipped)  # one rollback per bad batch

    clean = tmp_path / "clean"
    ref_losses, ref_params = _run(config(pad_data, clean, *common, f"trainer.skip_batches={skipped}"))
    resumed_at = [e["to_step"] for e in events if e["event"] == "rollback"][-1]
    tail = STEPS - resumed_at  # the steps after the last rollback: the same as the clean run's, bitwise
    assert losses[-tail:] == ref_losses[-tail:] and all(x == x for x in ref_losses)
    assert all(torch.equal(params[k], ref_params[k]) for k in ref_params)
