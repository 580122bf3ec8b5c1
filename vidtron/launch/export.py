"""vidtron-export: a training checkpoint -> consolidated safetensors in our, diffusers' or HunyuanVideo's layout.

    vidtron-export --ckpt runs/demo/checkpoints/step_000200 --format diffusers --out exports/demo-diffusers
    vidtron-export --ckpt runs/big/checkpoints/step_010000 --format hunyuan --out exports/big --dtype bfloat16
    vidtron-export --ckpt runs/vae/checkpoints/step_002000 --format diffusers --out exports/vae
    vidtron-data encode --root data/clips --out data/latents --vae exports/vae     # latents from the trained VAE

DiT formats: safetensors (our names + our DiTConfig), diffusers (loads with
`HunyuanVideoTransformer3DModel.from_pretrained(out)`), hunyuan (the original repository's names and fused
q;k;v tensors). An image-to-video DiT (model.image_condition=token_replace) has the text-to-video tensors; its
config says so (diffusers: `image_condition_type: "token_replace"`, hunyuan: `i2v_condition_type`). A `recipe=vae`
checkpoint exports its causal VAE only (not the discriminator): diffusers (loads with
`AutoencoderKLHunyuanVideo.from_pretrained(out)` and `vidtron-data encode --vae out`) or safetensors (our names, the
same config.json). The checkpoint's manifest supplies the recipe and model flavor; any saved layout
exports the same. The export streams shard by shard (memory: about one --max-shard-size) and appears at --out
only when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vidtron.errors import ConfigError, DataError
from vidtron.launch.cli import user_errors
from vidtron.models.dit.configs import DiTConfig, dit_config
from vidtron.models.vae import FLAVORS as VAE_FLAVORS
from vidtron.models.vae import VAEConfig
from vidtron.platform.checkpoint import read_manifest
from vidtron.platform.config import ModelConfig
from vidtron.platform.export import (
    DTYPES,
    ExportReport,
    check_checkpoint,
    check_output,
    export_checkpoint,
    parse_size,
)
from vidtron.platform.export_models import ALL_FORMATS


def checkpoint_config(ckpt: Path) -> DiTConfig | VAEConfig:
    """The config of the model a checkpoint holds: the VAEConfig of `vae.flavor` for a recipe=vae run, else the
    DiTConfig (flavor + arch overrides), both from its manifest."""
    try:
        config = read_manifest(ckpt)["config"]
        if config.get("recipe") == "vae":
            return _vae_config(ckpt, config["vae"]["flavor"])
        model = ModelConfig(**config["model"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"checkpoint {ckpt}: manifest.json has no usable config.model ({err!r})") from err
    return dit_config(model.flavor, model.arch_overrides())


def _vae_config(ckpt: Path, flavor: str) -> VAEConfig:
    if flavor not in VAE_FLAVORS:
        raise DataError(f"checkpoint {ckpt}: vae.flavor={flavor!r} is not a known VAE flavor {sorted(VAE_FLAVORS)}")
    return VAE_FLAVORS[flavor]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vidtron-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="a committed checkpoint folder (step_N)")
    p.add_argument("--format", required=True, help=f"one of {', '.join(ALL_FORMATS)} (a VAE: diffusers, safetensors)")
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.add_argument("--max-shard-size", default="5GB", help="largest weight file, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--dtype", default="keep", help=f"weights dtype: one of {', '.join(DTYPES)} (default keep)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the checkpoint's files")
    p.add_argument("--weights", default="model", choices=("model", "ema"), help="trained weights or their EMA")
    return p


def run_export(a: argparse.Namespace) -> ExportReport:
    if a.format not in ALL_FORMATS:
        raise ConfigError("--format", a.format, f"choose one of {ALL_FORMATS}")
    if a.dtype not in DTYPES:
        raise ConfigError("--dtype", a.dtype, f"choose one of {list(DTYPES)}")
    max_bytes = parse_size(a.max_shard_size)
    ckpt, out = Path(a.ckpt), Path(a.out)
    check_checkpoint(ckpt)
    check_output(out)
    cfg = checkpoint_config(ckpt)
    check = not a.no_verify
    return export_checkpoint(ckpt, a.format, out, cfg, max_bytes, DTYPES[a.dtype], check_files=check, weights=a.weights)


@user_errors("vidtron-export")
def main(argv: list[str] | None = None) -> int:
    report = run_export(_parser().parse_args(argv))
    gb = 1e9
    print(
        f"wrote {report.out}: {report.num_tensors} tensors, {report.total_bytes / gb:.3f} GB in "
        f"{len(report.files)} file(s) (largest {report.largest_shard_bytes / gb:.3f} GB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
