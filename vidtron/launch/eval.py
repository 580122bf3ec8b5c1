"""vidtron-eval: measure generated samples.

vidtron-eval captions --samples DIR [--holdout red:circle:left,... | --data-root DIR] [--json OUT]
    detect colour, shape, motion direction and start region in each sample_i.gif that vidtron-sample wrote
    and score it against sample_i.txt: accuracy per attribute and overall (every attribute right), split into
    held-out and seen combos when a holdout is given (or read from DIR/holdout.json of the training data).
vidtron-eval detector --data-root DIR [--limit N] [--json OUT]
    the same detector on the real clips of a `vidtron-data synth` folder against their captions (it should be
    near 100%: a sample's score is only as good as this).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vidtron.launch.cli import user_errors
from vidtron.platform.data.synth_media import parse_holdout
from vidtron.tools.caption_eval import evaluate, evaluate_folder, format_table, read_holdout, read_training_clips


def _holdout(a: argparse.Namespace) -> frozenset:
    if a.holdout:
        return parse_holdout(a.holdout)
    return read_holdout(a.data_root) if a.data_root else frozenset()


def run_captions(a: argparse.Namespace) -> dict:
    result = evaluate_folder(a.samples, _holdout(a))
    rows = {"all samples": result, **{name.replace("_", "-"): r for name, r in result.get("split", {}).items()}}
    print(format_table(rows))
    return result


def run_detector(a: argparse.Namespace) -> dict:
    result = evaluate(*read_training_clips(a.data_root, a.limit))
    print(format_table({f"detector on {result['n']} real clips": result}))
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vidtron-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("captions", help="score sampled clips against their captions")
    c.add_argument("--samples", required=True, help="a folder vidtron-sample wrote (sample_i.gif + sample_i.txt)")
    c.add_argument("--holdout", default="", help="colour:shape:direction combos held out of training")
    c.add_argument("--data-root", default="", help="the training data folder (its holdout.json names the holdout)")
    c.add_argument("--json", default="", help="also write the per-sample results here")
    d = sub.add_parser("detector", help="the detector's own accuracy on real clips")
    d.add_argument("--data-root", required=True, help="a vidtron-data synth folder")
    d.add_argument("--limit", type=int, default=0, help="first N clips only (0 = all)")
    d.add_argument("--json", default="", help="also write the per-sample results here")
    return p


@user_errors("vidtron-eval")
def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    result = run_captions(a) if a.cmd == "captions" else run_detector(a)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
