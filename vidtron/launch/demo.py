"""`make demo`: generate data -> train a tiny DiT with TP x CP on 4 CPU processes -> checkpoint -> sample -> plots.

Every stage runs the real command-line tools, so the demo exercises what users run. Prints where each
artifact is. Defaults fit in a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from vidtron.platform.metrics import read_metrics

PROMPTS = ("a red circle moves right from the middle left", "a yellow square moves down from the top centre")


def _run(args: list[str]) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def plot_losses(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    window = 10
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="flow-matching loss", title="dit-tiny on generated clips")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vidtron-demo", description=__doc__)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--layout", default="parallel.tp=2 parallel.cp=2", help="parallel overrides for the nproc processes")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    data, run, samples = out / "data", out / "run", out / "samples"
    py = sys.executable
    t0 = time.time()
    _run(
        [
            py,
            "-m",
            "vidtron.launch.data",
            "synth",
            "--out",
            str(data),
            "--clips",
            "64",
            "--frames",
            "9",
            "--height",
            "64",
            "--width",
            "64",
            "--overwrite",
        ]
    )
    train = [
        py,
        "-m",
        "vidtron.launch.train",
        f"data.root={data}",
        f"run_dir={run}",
        f"trainer.steps={a.steps}",
        "trainer.resume=never",
    ]
    train += ["trainer.checkpoint_every=100", f"launcher.nproc_per_node={a.nproc}", *a.layout.split()]
    _run(train)
    sample = [py, "-m", "vidtron.launch.sample", "--run-dir", str(run), "--out", str(samples), "--steps", "20"]
    _run(sample + [arg for prompt in PROMPTS for arg in ("--prompt", prompt)])
    curve = plot_losses(run, out / "loss_curve.png")
    records = read_metrics(run)
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    print(f"  data (webdataset shards + stand-in autoencoder): {data}")
    print(
        f"  metrics: {run / 'metrics.jsonl'}  (loss {records[0]['loss']:.3f} at step 1 -> {records[-1]['loss']:.3f} at step {records[-1]['step']})"
    )
    print(f"  checkpoints (DCP, layout {a.layout or 'data parallel'}): {run / 'checkpoints'}")
    print(f"  samples (MP4 + GIF + latents): {samples}")
    print(f"  loss curve: {curve}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
