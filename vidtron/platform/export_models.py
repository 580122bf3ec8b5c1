"""What `vidtron-export` can take out of a training checkpoint: the DiT, or the causal VAE of a `recipe=vae` run.

    model        checkpoint tensors   formats (weights prefix; config.json)
    DiT          model.*              safetensors (`model`; our DiTConfig)
                                      diffusers (`diffusion_pytorch_model`; HunyuanVideoTransformer3DModel's)
                                      hunyuan (`model`; the original repository's arguments)
    causal VAE   model.vae.*          diffusers (`diffusion_pytorch_model`; AutoencoderKLHunyuanVideo's)
                                      safetensors (`model`, our names; the same config.json)

A `recipe=vae` checkpoint also holds the discriminator (`model.disc.*`) and both optimizers: they are left out.
Both VAE folders load with `vidtron-data encode --vae FOLDER` (`load_causal_vae` takes either naming); the diffusers
one also with `AutoencoderKLHunyuanVideo.from_pretrained(FOLDER)`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vidtron.models.dit import DiT
from vidtron.models.dit.configs import DiTConfig
from vidtron.models.dit.configs import to_diffusers_config as dit_diffusers_config
from vidtron.models.dit.hunyuan_adapter import hunyuan_groups, to_hunyuan, to_hunyuan_config
from vidtron.models.dit.state_dict_adapter import to_diffusers as dit_to_diffusers
from vidtron.models.vae import CausalVAE, VAEConfig
from vidtron.models.vae.configs import to_diffusers_config as vae_diffusers_config
from vidtron.models.vae.state_dict_adapter import to_diffusers as vae_to_diffusers

StateDict = dict[str, torch.Tensor]
ModelConfig = DiTConfig | VAEConfig


@dataclass(frozen=True)
class Format:
    weights: str  # file prefix of the weights
    groups: Callable[[Iterable[str]], list[list[str]]]  # our names -> groups that convert to whole outputs
    convert: Callable[[StateDict], StateDict]  # our (partial) state dict -> this format's
    config: Callable[[ModelConfig], dict]  # config.json


@dataclass(frozen=True)
class ExportModel:
    """One kind of model a checkpoint can hold: where its tensors are, what it looks like, its formats."""

    name: str  # for messages
    prefix: str  # its tensors' names in the checkpoint's model state start with this ("" = the whole model)
    build: Callable[[ModelConfig], nn.Module]  # the model of a config (built on the meta device: names and shapes)
    formats: dict[str, Format]


def _one_each(keys: Iterable[str]) -> list[list[str]]:
    return [[k] for k in keys]


def _diffusers_version() -> str:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return "0.32.0"  # the first release with HunyuanVideo's transformer and VAE


def _dit_config(cfg: DiTConfig) -> dict:
    return {**dataclasses.asdict(cfg), "rope_axes_dim": list(cfg.rope_axes_dim)}


def _dit_diffusers_config(cfg: DiTConfig) -> dict:
    head = {"_class_name": "HunyuanVideoTransformer3DModel", "_diffusers_version": _diffusers_version()}
    return {**head, **dit_diffusers_config(cfg)}


def _vae_diffusers_config(cfg: VAEConfig) -> dict:
    head = {"_class_name": "AutoencoderKLHunyuanVideo", "_diffusers_version": _diffusers_version()}
    return {**head, **vae_diffusers_config(cfg)}


DIT = ExportModel(
    "DiT",
    "",
    DiT,
    {
        "safetensors": Format("model", _one_each, dict, _dit_config),
        "diffusers": Format("diffusion_pytorch_model", _one_each, dit_to_diffusers, _dit_diffusers_config),
        "hunyuan": Format("model", hunyuan_groups, to_hunyuan, to_hunyuan_config),
    },
)
VAE = ExportModel(
    "causal VAE (recipe=vae)",
    "vae.",
    CausalVAE,
    {
        "diffusers": Format("diffusion_pytorch_model", _one_each, vae_to_diffusers, _vae_diffusers_config),
        "safetensors": Format("model", _one_each, dict, _vae_diffusers_config),
    },
)
ALL_FORMATS = list(dict.fromkeys([*DIT.formats, *VAE.formats]))


def export_model(cfg: ModelConfig) -> ExportModel:
    """The model kind a config describes."""
    return VAE if isinstance(cfg, VAEConfig) else DIT


def expected_shapes(model: ExportModel, cfg: ModelConfig) -> dict[str, torch.Size]:
    """Our parameter names -> shapes of `model` built with `cfg` (on the meta device, no memory)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in model.build(cfg).state_dict().items()}
