"""Spec -> model: the diffusers ``UNet2DModel`` with the originals' surgery, or the fast.ai course UNet.

Both families are called as ``model(x, t)`` with ``x`` [B, 4, 32, 32] and ``t`` [B] and return the
predicted noise [B, 4, 32, 32]. The caller seeds torch before ``build``; nothing here seeds.

Surgery on the diffusers UNet happens after construction, as the original notebooks did it:
norms are swapped module by module, then the resnets' ``conv2`` weights are initialised.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from runner.course_unet import EmbResBlock, EmbUNetModel, SelfAttention2D
from runner.model_notes import ATTENTION_NORM_NOTE, CONV_FLAG_NOTE  # torch-free: the site renders them
from runner.spec import ModelSpec, Spec

__all__ = [
    "CONV_FLAG_NOTE",
    "ATTENTION_NORM_NOTE",
    "ChannelLayerNorm",
    "DiffusersDenoiser",
    "EmbResBlock",
    "build",
    "check_plain_layers",
    "count_module_types",
    "is_attention_block",
    "is_residual_block",
    "param_count",
]

SAMPLE_SIZE = 32
LATENT_CHANNELS = 4
UP_BLOCK = {"DownBlock2D": "UpBlock2D", "AttnDownBlock2D": "AttnUpBlock2D"}


class DiffusersDenoiser(nn.Module):
    """``UNet2DModel`` called as ``model(x, t)`` returning the tensor (not the diffusers output object)."""

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels alone for a (B, C, L) tensor: the originals' ``layernorm_ch`` attention."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


# ---------------------------------------------------------------- public API


def build(spec: Spec | ModelSpec) -> nn.Module:
    """Build the model a spec (or its ``model`` section) describes, in training mode, on the CPU."""
    m = spec.model if isinstance(spec, Spec) else spec
    model = _build_course(m) if m.family == "course" else _build_diffusers(m)
    _set_batchnorm_momentum(model, m.batchnorm_momentum)
    return model


def is_residual_block(name: str, module: nn.Module) -> bool:
    """Stats filter: diffusers ``ResnetBlock2D`` or the course's ``EmbResBlock``, as the originals hooked."""
    return isinstance(module, (ResnetBlock2D, EmbResBlock))


def is_attention_block(name: str, module: nn.Module) -> bool:
    """Stats filter: diffusers ``Attention`` modules or the course's ``SelfAttention2D``."""
    return isinstance(module, (Attention, SelfAttention2D))


def count_module_types(model: nn.Module) -> Counter[str]:
    """How many modules of each class name the model holds (itself included)."""
    return Counter(type(mod).__name__ for mod in model.modules())


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_plain_layers(model: nn.Module) -> None:
    """Raise if a LoRA-style layer remains or a resnet's conv/linear is not plain ``nn.Conv2d``/``nn.Linear``.

    This is what ``conv: conv2d`` means with current diffusers (see ``CONV_FLAG_NOTE``).
    """
    lora = [name for name, mod in model.named_modules() if "lora" in type(mod).__name__.lower()]
    odd = []
    for name, mod in model.named_modules():
        if isinstance(mod, ResnetBlock2D):
            for attr, cls in (("conv1", nn.Conv2d), ("conv2", nn.Conv2d), ("conv_shortcut", nn.Conv2d),
                              ("time_emb_proj", nn.Linear)):
                sub = getattr(mod, attr, None)
                if sub is not None and type(sub) is not cls:
                    odd.append(f"{name}.{attr} ({type(sub).__name__})")
    if lora or odd:
        raise RuntimeError(
            "conv: conv2d expects plain nn.Conv2d/nn.Linear layers, but this diffusers version built "
            f"LoRA-style or subclassed layers: {', '.join(lora + odd)[:500]}. Swap them for "
            "nn.Conv2d/nn.Linear (copying weights) in runner/models.py, as the original notebooks did."
        )


# ---------------------------------------------------------------- diffusers family


def _build_diffusers(m: ModelSpec) -> DiffusersDenoiser:
    unet = UNet2DModel(
        sample_size=SAMPLE_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=tuple(m.block_out_channels),
        layers_per_block=m.layers_per_block,
        down_block_types=m.down_block_types,
        up_block_types=tuple(UP_BLOCK[b] for b in reversed(m.down_block_types)),
    )
    shapes = _norm_input_shapes(unet) if "layer" in (m.resnet_norm, m.attention_norm) else {}
    _swap_resnet_norms(unet, m.resnet_norm, shapes)
    _swap_attention_norms(unet, m.attention_norm, shapes)
    if m.out_norm == "batch":
        unet.conv_norm_out = nn.BatchNorm2d(unet.conv_norm_out.num_channels)
    if m.conv == "conv2d":
        check_plain_layers(unet)
    resnets = [r for r in unet.modules() if isinstance(r, ResnetBlock2D)]
    if m.init == "xavier_normal_relu_conv1_conv2":
        _init_convs([c for r in resnets for c in (r.conv1, r.conv2)], "xavier_normal_relu")
    else:
        _init_convs([r.conv2 for r in resnets], m.init)
    return DiffusersDenoiser(unet)


def _set_batchnorm_momentum(model: nn.Module, momentum: float | str) -> None:
    """Every BatchNorm's running-statistics momentum; "cumulative" is PyTorch's momentum=None
    (running statistics = the equal-weight average over all batches seen)."""
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.momentum = None if momentum == "cumulative" else momentum


def _norm_input_shapes(unet: UNet2DModel) -> dict[nn.Module, tuple[int, ...]]:
    """Per-item input shape of every resnet norm and attention group_norm, from one dummy 32x32 forward.

    LayerNorm needs the full (C, H, W) or (C, H*W) shape, which depends on the level and, in the up
    path, on the skip concatenation; a forward pass reads it instead of re-deriving diffusers' wiring.
    """
    resnets = [r for r in unet.modules() if isinstance(r, ResnetBlock2D)]
    norms = [getattr(r, a) for r in resnets for a in ("norm1", "norm2")]
    norms += [a.group_norm for a in unet.modules() if isinstance(a, Attention) and a.group_norm is not None]
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def record(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        shapes[mod] = tuple(args[0].shape[1:])

    handles = [n.register_forward_pre_hook(record) for n in norms]
    try:
        with torch.no_grad():
            x = torch.zeros(1, LATENT_CHANNELS, SAMPLE_SIZE, SAMPLE_SIZE)
            unet(x, torch.zeros(1))
    finally:
        for h in handles:
            h.remove()
    return shapes


def _swap_resnet_norms(unet: UNet2DModel, kind: str, shapes: dict[nn.Module, tuple[int, ...]]) -> None:
    if kind == "group":
        return
    for resnet in [r for r in unet.modules() if isinstance(r, ResnetBlock2D)]:
        for attr in ("norm1", "norm2"):
            old = getattr(resnet, attr)
            new = nn.BatchNorm2d(old.num_channels) if kind == "batch" else nn.LayerNorm(list(shapes[old]))
            setattr(resnet, attr, new)


def _swap_attention_norms(unet: UNet2DModel, kind: str, shapes: dict[nn.Module, tuple[int, ...]]) -> None:
    if kind == "group":
        return
    make: dict[str, Callable[[nn.GroupNorm], nn.Module]] = {
        "layer": lambda old: nn.LayerNorm(list(shapes[old])),
        "layer_channels": lambda old: ChannelLayerNorm(old.num_channels),
        "batch": lambda old: nn.BatchNorm1d(old.num_channels),
    }
    for attn in [a for a in unet.modules() if isinstance(a, Attention)]:
        if attn.group_norm is None:
            raise RuntimeError("attention_norm: this diffusers Attention has no group_norm to replace")
        attn.group_norm = make[kind](attn.group_norm)


def _init_convs(convs: list[nn.Conv2d], init: str) -> None:
    """zero_conv2: zero the weights (biases kept, as the originals' ``conv2.weight.data.zero_()``)."""
    with torch.no_grad():
        for conv in convs:
            if init == "zero_conv2":
                conv.weight.zero_()
            elif init == "xavier_normal_relu":
                nn.init.xavier_normal_(conv.weight, gain=nn.init.calculate_gain("relu"))


# ---------------------------------------------------------------- course family


def _build_course(m: ModelSpec) -> EmbUNetModel:
    model = EmbUNetModel(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        nfs=tuple(m.block_out_channels),
        num_layers=m.layers_per_block,
        attn_chans=m.attention_head_dim,
        attn_start=m.attention_start,
    )
    _init_convs(model.residual_convs(), m.init)
    return model
