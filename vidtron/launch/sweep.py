"""vidtron-sweep: a scaling-law sweep of the DiT, trained by vidtron-train, fitted into a report.

    vidtron-sweep recipe=scaling_sweep out=sweep_out data.root=data/synth sizes=4 budgets=2e4:2e5:6
    vidtron-sweep out=sweep_out data.root=data/synth sizes=32x1,64x2,128x4 budgets=1e4,3e4,1e5 --max-parallel 2
    vidtron-sweep ... optim.lr=2e-3 data.batch_size=16 --budget-pflops 1e-3
    vidtron-sweep ... launcher=ray --max-parallel 4                # each run a Ray task (ray_address=... or local)
    vidtron-sweep ... launcher=slurm cluster=local_cpu [dry_run=true]   # each run an sbatch job

Keys are `key=value` (or `--key value`); dotted keys (data.root, optim.lr, ...) are vidtron-train overrides
passed to every run. Rerunning the same command skips finished runs and resumes the others. Exit codes:
0 done, 1 a run or the fit failed (rerun to retry), 2 a bad argument. Sweep keys and defaults:
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys

from vidtron.errors import ConfigError
from vidtron.launch import sweep_launchers
from vidtron.launch.cli import user_errors
from vidtron.launch.cluster import load_cluster
from vidtron.recipes.scaling.grid import SweepConfig
from vidtron.recipes.scaling.sweep import run_sweep, say

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _convert(name: str, kind: str, text: str):
    """A CLI string as the field's type (int, float, bool or str)."""
    try:
        if kind == "int":
            return int(float(text)) if float(text).is_integer() else int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ConfigError(name, text, f"must be a number ({kind})") from None
    if kind == "bool":
        if text.lower() not in _TRUE + _FALSE:
            raise ConfigError(name, text, "must be true or false")
        return text.lower() in _TRUE
    return text


def _pairs(argv: list[str]) -> list[tuple[str, str]]:
    """`key=value`, `--key=value` and `--key value` items as (key, value); dashes in keys become underscores."""
    pairs, i = [], 0
    while i < len(argv):
        item = argv[i]
        if item.startswith("--") and "=" not in item:
            if i + 1 >= len(argv):
                raise ConfigError(item, None, f"give a value: {item} VALUE or {item.lstrip('-')}=VALUE")
            item, i = f"{item}={argv[i + 1]}", i + 1
        key, sep, value = item.partition("=")
        if not sep or not key.strip("-"):
            raise ConfigError("argument", item, "write key=value, e.g. out=sweep_out (see vidtron-sweep --help)")
        pairs.append((key.lstrip("-").replace("-", "_") if "." not in key else key.lstrip("-"), value))
        i += 1
    return pairs


def parse_args(argv: list[str]) -> SweepConfig:
    """SweepConfig from CLI items; unknown undotted keys fail with the list of known ones."""
    fields = {f.name: f.type for f in dataclasses.fields(SweepConfig) if f.name != "train"}
    values, train = {}, {}
    for key, value in _pairs(argv):
        if "." in key:
            train[key] = value
        elif key in fields:
            values[key] = _convert(key, fields[key], value)
        else:
            raise ConfigError(key, value, f"unknown key; choose one of {sorted(fields)} or a dotted vidtron-train key")
    cfg = SweepConfig(**values, train=train)
    if cfg.launcher == "slurm":
        load_cluster(cfg.cluster)  # ConfigError for a missing or malformed cluster yaml
    return cfg


def _field_help() -> list[str]:
    """'  name = default  # comment' for each SweepConfig field, read from its source."""
    lines = inspect.getsource(SweepConfig).splitlines()
    pattern = re.compile(r"^\s+(\w+): [^=]+= (.+?)\s+# (.*)$")
    return [f"  {m[1]}={m[2]}  # {m[3]}" for m in map(pattern.match, lines) if m and m[1] != "train"]


def _print_summary(status: dict, cfg: SweepConfig) -> None:
    say(f"ran {status['ran']}, skipped (finished) {status['skipped']}, failed {status['failed']}")
    say(f"{len(status['rows'])} rows in {cfg.out}/results.csv and results.json")
    rep = status.get("report")
    if rep is not None:
        a = rep["approach1"]
        say(f"N_opt = {a['a1']:.4g} C^{a['b1']:.4f}, D_opt = {a['a2']:.4g} C^{a['b2']:.4f} (C in PFLOPs)")
        say(f"report: {rep['files']['markdown']}")
    elif status.get("report_error"):
        say(f"no report: {status['report_error']}")


@user_errors("vidtron-sweep")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ + "\n".join(_field_help()))
        return 0
    cfg = parse_args(argv)
    status = run_sweep(cfg, sweep_launchers)
    if status.get("dry_run"):
        say(f"dry run: {len(status['scripts'])} job scripts printed, nothing submitted")
        return 0
    _print_summary(status, cfg)
    return 0 if status["report"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
