"""The fast.ai course (part 2, 2023) latent-diffusion UNet, written from its published description.

This is the model of the course's lesson notebook ``30_lsun_diffusion-latents`` (miniai's
``EmbUNetModel``): pre-activation residual blocks (BatchNorm -> SiLU -> conv) whose timestep
embedding scales and shifts the activations after the first conv, optional self-attention
inside the residual blocks from level ``attn_start`` on, stride-2 conv downsampling,
nearest-neighbour + conv upsampling, and skip connections concatenated in the up path.

Layer names follow the course (``downs.0.resnets.0.conv2``, ``mid_block``, ``ups``...), so
statistics recorded here read like the originals', which hooked every ``EmbResBlock``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, emb_dim: int, max_period: float = 10000) -> torch.Tensor:
    """The course's sinusoidal embedding of a continuous t (designed for t in [0, 1)): [B] -> [B, emb_dim]."""
    exponent = -math.log(max_period) * torch.linspace(0, 1, emb_dim // 2, device=t.device)
    emb = t[:, None].float() * exponent.exp()[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=-1)
    return F.pad(emb, (0, 1, 0, 0)) if emb_dim % 2 == 1 else emb


def pre_conv(ni: int, nf: int, ks: int = 3, stride: int = 1, norm: type[nn.Module] | None = None,
             bias: bool = True) -> nn.Sequential:
    """Pre-activation conv: [norm ->] SiLU -> conv (the conv is always the last layer)."""
    layers = nn.Sequential()
    if norm is not None:
        layers.append(norm(ni))
    layers.append(nn.SiLU())
    layers.append(nn.Conv2d(ni, nf, kernel_size=ks, stride=stride, padding=ks // 2, bias=bias))
    return layers


def lin(ni: int, nf: int, norm: type[nn.Module] | None = None) -> nn.Sequential:
    """Pre-activation linear layer: [norm ->] SiLU -> Linear."""
    layers = nn.Sequential()
    if norm is not None:
        layers.append(norm(ni))
    layers.append(nn.SiLU())
    layers.append(nn.Linear(ni, nf))
    return layers


def upsample(nf: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(nf, nf, 3, padding=1))


class SelfAttention2D(nn.Module):
    """The course's self-attention over the H*W positions of a feature map, ``attn_chans`` channels per head.

    Returns only the attention branch; the residual block adds it to its input. As in the course,
    the fused qkv projection is split into heads first and each head's slice is then cut into q, k, v.
    """

    def __init__(self, ni: int, attn_chans: int):
        super().__init__()
        self.nheads = ni // attn_chans
        self.scale = math.sqrt(ni / self.nheads)
        self.norm = nn.LayerNorm(ni)
        self.qkv = nn.Linear(ni, ni * 3)
        self.proj = nn.Linear(ni, ni)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        s, heads = h * w, self.nheads
        x = self.qkv(self.norm(x.view(n, c, s).transpose(1, 2)))
        # Course: rearrange 'n s (h d) -> (n h) s d', then chunk d into q, k, v.
        x = x.view(n, s, heads, -1).transpose(1, 2)
        q, k, v = torch.chunk(x, 3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v, scale=1 / self.scale)
        x = self.proj(x.transpose(1, 2).reshape(n, s, -1))
        return x.transpose(1, 2).reshape(n, c, h, w)


class EmbResBlock(nn.Module):
    """Pre-activation residual block with timestep scale/shift and optional self-attention (the course's)."""

    def __init__(self, n_emb: int, ni: int, nf: int | None = None, attn_chans: int = 0):
        super().__init__()
        nf = ni if nf is None else nf
        self.emb_proj = nn.Linear(n_emb, nf * 2)
        self.conv1 = pre_conv(ni, nf, norm=nn.BatchNorm2d)
        self.conv2 = pre_conv(nf, nf, norm=nn.BatchNorm2d)
        self.idconv = nn.Identity() if ni == nf else nn.Conv2d(ni, nf, 1)
        self.attn = SelfAttention2D(nf, attn_chans) if attn_chans else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        inp = x
        x = self.conv1(x)
        scale, shift = torch.chunk(self.emb_proj(F.silu(emb))[:, :, None, None], 2, dim=1)
        x = x * (1 + scale) + shift
        x = self.conv2(x) + self.idconv(inp)
        if self.attn is not None:
            x = x + self.attn(x)
        return x


class DownBlock(nn.Module):
    def __init__(self, n_emb: int, ni: int, nf: int, add_down: bool, num_layers: int, attn_chans: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            EmbResBlock(n_emb, ni if i == 0 else nf, nf, attn_chans=attn_chans) for i in range(num_layers)
        )
        self.down = nn.Conv2d(nf, nf, 3, stride=2, padding=1) if add_down else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the output and the skip tensors (each resnet's output, then the downsampled map)."""
        saved = []
        for resnet in self.resnets:
            x = resnet(x, emb)
            saved.append(x)
        if self.down is not None:
            x = self.down(x)
            saved.append(x)
        return x, saved


class UpBlock(nn.Module):
    def __init__(self, n_emb: int, ni: int, prev_nf: int, nf: int, add_up: bool, num_layers: int,
                 attn_chans: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            EmbResBlock(
                n_emb,
                (prev_nf if i == 0 else nf) + (ni if i == num_layers - 1 else nf),
                nf,
                attn_chans=attn_chans,
            )
            for i in range(num_layers)
        )
        self.up = upsample(nf) if add_up else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(torch.cat([x, skips.pop()], dim=1), emb)
        return x if self.up is None else self.up(x)


class EmbUNetModel(nn.Module):
    """The course UNet: ``nfs`` channels per level, ``num_layers`` resnets per down level (+1 per up one)."""

    def __init__(self, in_channels: int = 4, out_channels: int = 4, nfs: tuple[int, ...] = (32, 64, 64, 128),
                 num_layers: int = 2, attn_chans: int = 8, attn_start: int = 2):
        super().__init__()
        n = len(nfs)
        self.conv_in = nn.Conv2d(in_channels, nfs[0], kernel_size=3, padding=1)
        self.n_temb = nf = nfs[0]
        n_emb = nf * 4
        self.emb_mlp = nn.Sequential(lin(self.n_temb, n_emb, norm=nn.BatchNorm1d), lin(n_emb, n_emb))
        self.downs = nn.ModuleList()
        for i in range(n):
            ni, nf = nf, nfs[i]
            attn = 0 if i < attn_start else attn_chans
            self.downs.append(
                DownBlock(n_emb, ni, nf, add_down=i != n - 1, num_layers=num_layers, attn_chans=attn)
            )
        self.mid_block = EmbResBlock(n_emb, nfs[-1])
        rev = list(reversed(nfs))
        nf = rev[0]
        self.ups = nn.ModuleList()
        for i in range(n):
            prev_nf, nf = nf, rev[i]
            ni = rev[min(i + 1, n - 1)]
            # Up block i works at level n-1-i: attention there iff that level >= attn_start.
            attn = 0 if i >= n - attn_start else attn_chans
            self.ups.append(
                UpBlock(n_emb, ni, prev_nf, nf, add_up=i != n - 1, num_layers=num_layers + 1, attn_chans=attn)
            )
        self.conv_out = pre_conv(nfs[0], out_channels, norm=nn.BatchNorm2d, bias=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.emb_mlp(timestep_embedding(t, self.n_temb))
        x = self.conv_in(x)
        skips = [x]
        for block in self.downs:
            x, saved = block(x, emb)
            skips += saved
        x = self.mid_block(x, emb)
        for block in self.ups:
            x = block(x, emb, skips)
        return self.conv_out(x)

    def residual_convs(self) -> list[nn.Conv2d]:
        """The last conv of every down/up residual block: what the course's ``init_ddpm`` zeroes.

        The course's init leaves ``mid_block`` alone, so it is not listed.
        """
        blocks = [r for level in (*self.downs, *self.ups) for r in level.resnets]
        return [r.conv2[-1] for r in blocks]
