"""Models: every configuration of the original experiments builds, runs and has the layers its spec says."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from runner.course_unet import EmbResBlock, SelfAttention2D, timestep_embedding
from runner.models import (
    CONV_FLAG_NOTE,
    ChannelLayerNorm,
    build,
    check_plain_layers,
    count_module_types,
    is_attention_block,
    is_residual_block,
    param_count,
)
from runner.spec import build_spec

LATENTS = Path(__file__).resolve().parents[1] / "data" / "lsun_bedroom_10k" / "latents_nonorm_f16.npy"
C4 = [32, 64, 64, 128]
C5 = [32, 32, 64, 64, 128]
C6 = [32, 32, 64, 64, 128, 128]

# (channels, blocks, resnet_norm, attention_norm, out_norm, init, conv): the original notebooks' models.
ORIGINAL_CONFIGS = {
    "nonorm": (C4, "DAAA", "group", "group", "group", "zero_conv2", "diffusers"),
    "batchnorm_resnets": (C4, "DAAA", "batch", "group", "group", "zero_conv2", "diffusers"),
    "batchnorm_batchnorm": (C4, "DAAA", "batch", "batch", "group", "zero_conv2", "diffusers"),
    "batchnorm_layernorm": (C4, "DAAA", "batch", "layer", "group", "zero_conv2", "diffusers"),
    "batchnorm_layernorm_ch": (C4, "DAAA", "batch", "layer_channels", "group", "zero_conv2", "diffusers"),
    "layernorm_layernorm": (C4, "DAAA", "layer", "layer", "group", "zero_conv2", "diffusers"),
    "batchnorm_resnets_noinit": (C4, "DAAA", "batch", "group", "group", "default", "diffusers"),
    "daaaa_named": (C5, "DAAAA", "batch", "group", "batch", "xavier_normal_relu", "conv2d"),
    "daaaaa_as_run": (C6, "DAAAAA", "batch", "group", "batch", "xavier_normal_relu", "conv2d"),
    "ddaad_named": (C5, "DDAAD", "batch", "group", "batch", "xavier_normal_relu", "diffusers"),
    "ddaadd_bn_as_run": (C6, "DDAADD", "batch", "group", "batch", "xavier_normal_relu", "diffusers"),
    "ddaadd_group": (C6, "DDAADD", "group", "group", "group", "xavier_normal_relu", "diffusers"),
    "daad": (C4, "DAAD", "group", "group", "group", "zero_conv2", "diffusers"),
}
ATTN_NORM_CLASS = {"group": nn.GroupNorm, "layer": nn.LayerNorm, "layer_channels": ChannelLayerNorm,
                   "batch": nn.BatchNorm1d}


def make_spec(**model):
    return build_spec({"id": "t", "model": model}, "test")


def model_spec(name):
    ch, blocks, rn, an, on, init, conv = ORIGINAL_CONFIGS[name]
    return make_spec(block_out_channels=ch, blocks=blocks, resnet_norm=rn, attention_norm=an, out_norm=on,
                     init=init, conv=conv)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def latents():
    rows = np.load(LATENTS, mmap_mode="r")[[0, 9000]]
    return torch.from_numpy(np.asarray(rows, dtype=np.float32)) * 0.2


def forward_backward(model, x, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(len(x), generator=g)
    noise = torch.randn(x.shape, generator=g)
    out = model(x + noise, t)
    assert out.shape == x.shape
    loss = F.mse_loss(out, noise)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0
    return out


def expected_counts(ch, blocks, layers=2):
    """Resnets and attention modules a mirrored diffusers UNet must have, counted from the spec alone."""
    levels = len(ch)
    resnets = levels * layers + levels * (layers + 1) + 2  # down, up (one extra per level), mid block
    attn = blocks.count("A") * layers + blocks.count("A") * (layers + 1) + 1  # mid block has one
    return resnets, attn


@pytest.mark.parametrize("name", list(ORIGINAL_CONFIGS))
def test_original_configs_build_and_train_one_step(name, latents):
    torch.manual_seed(0)
    spec = model_spec(name)
    ch, blocks, rn, an, on, init, conv = ORIGINAL_CONFIGS[name]
    model = build(spec)
    unet = model.unet
    counts = count_module_types(model)
    resnets, attn = expected_counts(ch, blocks)
    assert counts["ResnetBlock2D"] == resnets
    assert counts["Attention"] == attn
    assert counts["AttnDownBlock2D"] == blocks.count("A") and counts["AttnUpBlock2D"] == blocks.count("A")
    # Up blocks mirror down blocks: the first up block works at the deepest level.
    assert [type(b).__name__ for b in unet.up_blocks] == [
        {"D": "UpBlock2D", "A": "AttnUpBlock2D"}[c] for c in reversed(blocks)
    ]
    resnet_blocks = [r for r in unet.modules() if isinstance(r, ResnetBlock2D)]
    norms = [getattr(r, a) for r in resnet_blocks for a in ("norm1", "norm2")]
    resnet_cls = {"group": nn.GroupNorm, "batch": nn.BatchNorm2d, "layer": nn.LayerNorm}[rn]
    assert all(type(n) is resnet_cls for n in norms)
    attn_norms = [a.group_norm for a in unet.modules() if isinstance(a, Attention)]
    assert all(type(n) is ATTN_NORM_CLASS[an] for n in attn_norms)
    assert type(unet.conv_norm_out) is (nn.BatchNorm2d if on == "batch" else nn.GroupNorm)
    assert counts["BatchNorm2d"] == 2 * resnets * (rn == "batch") + (on == "batch")
    assert counts["BatchNorm1d"] == attn * (an == "batch")
    assert counts["GroupNorm"] == 2 * resnets * (rn == "group") + attn * (an == "group") + (on == "group")
    assert counts["LayerNorm"] == 2 * resnets * (rn == "layer") + attn * (an in ("layer", "layer_channels"))
    assert not [n for n in counts if "LoRA" in n]
    forward_backward(model, latents)


def test_layernorm_shapes_follow_each_blocks_input():
    model = build(make_spec(resnet_norm="layer", attention_norm="layer"))
    unet = model.unet
    assert tuple(unet.down_blocks[0].resnets[0].norm1.normalized_shape) == (32, 32, 32)
    assert tuple(unet.down_blocks[1].resnets[0].norm1.normalized_shape) == (32, 16, 16)  # input: 32 ch
    assert tuple(unet.down_blocks[1].resnets[0].norm2.normalized_shape) == (64, 16, 16)
    # First up block: deepest level (4x4), its input is the 128-channel map concatenated with a 128 skip.
    assert tuple(unet.up_blocks[0].resnets[0].norm1.normalized_shape) == (256, 4, 4)
    assert tuple(unet.mid_block.attentions[0].group_norm.normalized_shape) == (128, 16)
    assert tuple(unet.down_blocks[1].attentions[0].group_norm.normalized_shape) == (64, 256)


def test_channel_layernorm_normalises_each_position_over_channels():
    x = torch.randn(2, 8, 5) * 3 + 1
    y = ChannelLayerNorm(8)(x)
    assert torch.allclose(y.mean(dim=1), torch.zeros(2, 5), atol=1e-5)
    assert torch.allclose(y.var(dim=1, unbiased=False), torch.ones(2, 5), atol=1e-3)


def residual_branch_gap(model, latents, block_type):
    """Max |block output - shortcut(input) - conv2 bias| over all residual blocks, for one forward pass.

    With conv2's weight zero, conv2 outputs just its bias, so each block's output must be its
    shortcut path plus that constant: the residual branch contributes nothing that depends on the
    input. Any other init (or zeroing the wrong conv) leaves a large gap.
    """
    gaps = []

    def hook(mod, args, out):
        x = args[0]
        if isinstance(mod, ResnetBlock2D):
            short = mod.conv_shortcut(x) if mod.conv_shortcut is not None else x
            expect = short + mod.conv2.bias[None, :, None, None]
        else:
            expect = mod.idconv(x) + mod.conv2[-1].bias[None, :, None, None]
            if mod.attn is not None:
                expect = expect + mod.attn(expect)
        gaps.append((out - expect).abs().max().item())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, block_type)]
    with torch.no_grad():
        model(latents, torch.full((len(latents),), 0.5))
    for h in handles:
        h.remove()
    return gaps


def test_zero_conv2_makes_every_resnet_pass_its_shortcut(latents):
    torch.manual_seed(0)
    zero = build(make_spec(init="zero_conv2"))
    gaps = residual_branch_gap(zero, latents, ResnetBlock2D)
    assert len(gaps) == 22 and max(gaps) < 1e-5
    # The bias is kept (the originals zeroed conv2.weight only).
    assert all(r.conv2.bias.abs().sum() > 0 for r in zero.modules() if isinstance(r, ResnetBlock2D))
    torch.manual_seed(0)
    default = build(make_spec(init="default"))
    assert min(residual_branch_gap(default, latents, ResnetBlock2D)) > 1e-3


def test_xavier_init_matches_the_formula():
    torch.manual_seed(0)
    model = build(make_spec(block_out_channels=C6, blocks="DDAADD", init="xavier_normal_relu"))
    gain = math.sqrt(2.0)
    checked = 0
    for r in model.modules():
        if isinstance(r, ResnetBlock2D) and r.conv2.weight.numel() >= 32 * 32 * 9:
            w = r.conv2.weight
            fan = w.shape[1] * 9 + w.shape[0] * 9
            expected = gain * math.sqrt(2.0 / fan)
            assert abs(w.std().item() / expected - 1) < 0.06, (w.shape, w.std().item(), expected)
            checked += 1
    assert checked == 2 * 6 + 3 * 6 + 2
    torch.manual_seed(0)
    default = build(make_spec(block_out_channels=C6, blocks="DDAADD", init="default"))
    w = default.unet.up_blocks[0].resnets[0].conv2.weight
    assert abs(w.std().item() / (gain * math.sqrt(2.0 / (w.shape[1] * 18))) - 1) > 0.3


def test_conv_flag_is_a_verified_no_op():
    torch.manual_seed(0)
    a = build(make_spec(conv="conv2d"))
    torch.manual_seed(0)
    b = build(make_spec(conv="diffusers"))
    assert count_module_types(a) == count_module_types(b)
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)
    assert "nn.Conv2d" in CONV_FLAG_NOTE

    class LoRACompatibleConv(nn.Conv2d):  # stands in for the old diffusers class
        pass

    a.unet.down_blocks[0].resnets[0].conv1 = LoRACompatibleConv(32, 32, 3, padding=1)
    with pytest.raises(RuntimeError, match="down_blocks.0.resnets.0.conv1"):
        check_plain_layers(a)


def test_module_names_and_stats_filters():
    model = build(make_spec())
    names = dict(model.named_modules())
    assert "unet.down_blocks.0.resnets.0" in names
    res = [n for n, m in names.items() if is_residual_block(n, m)]
    att = [n for n, m in names.items() if is_attention_block(n, m)]
    assert len(res) == 22 and len(att) == 16
    assert "unet.mid_block.attentions.0" in att


def course_spec(**over):
    return make_spec(family="course", block_out_channels=C4, layers_per_block=2, **over)


def test_course_unet_builds_trains_and_counts(latents):
    torch.manual_seed(0)
    model = build(course_spec())
    counts = count_module_types(model)
    assert counts["EmbResBlock"] == 4 * 2 + 4 * 3 + 1
    assert counts["SelfAttention2D"] == 2 * 2 + 2 * 3  # levels 2 and 3, down and up
    assert {m.nheads for m in model.modules() if isinstance(m, SelfAttention2D)} == {8, 16}  # 64/8, 128/8
    n = param_count(model)
    print(f"course UNet (32,64,64,128): {n:,} parameters")
    assert n == 4_470_240
    names = dict(model.named_modules())
    assert sum(is_residual_block(k, v) for k, v in names.items()) == 21
    assert sum(is_attention_block(k, v) for k, v in names.items()) == 10
    forward_backward(model, latents)


def test_course_zero_init_passes_shortcut_and_xavier(latents):
    torch.manual_seed(0)
    zero = build(course_spec())
    gaps = residual_branch_gap(zero, latents, EmbResBlock)
    # The course's init_ddpm zeroes downs and ups only; the mid block (run between them) keeps its init.
    mid = zero.mid_block
    assert mid.conv2[-1].weight.abs().sum() > 0
    assert len(gaps) == 21 and sorted(gaps)[-2] < 1e-5 and max(gaps) > 1e-3
    torch.manual_seed(0)
    xav = build(course_spec(init="xavier_normal_relu"))
    w = xav.ups[0].resnets[0].conv2[-1].weight  # 128 -> 128, 3x3
    assert abs(w.std().item() / (math.sqrt(2) * math.sqrt(2 / (128 * 18))) - 1) < 0.05


def test_course_attention_matches_the_course_computation():
    torch.manual_seed(0)
    att = SelfAttention2D(16, 4)
    x = torch.randn(2, 16, 3, 3)
    # The course's code, literally: transpose, norm, qkv, split into heads, chunk, softmax(qk/scale)v.
    h = att.qkv(att.norm(x.view(2, 16, 9).transpose(1, 2)))
    h = h.view(2, 9, 4, 12).permute(0, 2, 1, 3).reshape(8, 9, 12)
    q, k, v = torch.chunk(h, 3, dim=-1)
    y = ((q @ k.transpose(1, 2)) / math.sqrt(16 / 4)).softmax(-1) @ v
    y = att.proj(y.view(2, 4, 9, 4).permute(0, 2, 1, 3).reshape(2, 9, 16))
    y = y.transpose(1, 2).reshape(2, 16, 3, 3)
    assert torch.allclose(att(x), y, atol=1e-5)


def test_course_timestep_embedding():
    t = torch.tensor([0.0, 0.3])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.linspace(0, 1, 4))
    assert torch.allclose(emb[1], torch.cat([(0.3 * freqs).sin(), (0.3 * freqs).cos()]))
    assert torch.equal(emb[0], torch.cat([torch.zeros(4), torch.ones(4)]))
    assert timestep_embedding(t, 9).shape == (2, 9)


def test_xavier_on_conv1_and_conv2_as_the_initupg_original():
    torch.manual_seed(0)
    model = build(make_spec(block_out_channels=[64, 128, 256, 512], init="xavier_normal_relu_conv1_conv2"))
    gain = math.sqrt(2.0)
    resnets = [r for r in model.modules() if isinstance(r, ResnetBlock2D)]
    for r in resnets:
        for w in (r.conv1.weight, r.conv2.weight):
            expected = gain * math.sqrt(2.0 / (w.shape[1] * 9 + w.shape[0] * 9))
            assert abs(w.std().item() / expected - 1) < 0.06, (w.shape, w.std().item(), expected)
    assert len(resnets) == 2 * 4 + 3 * 4 + 2


@pytest.mark.parametrize("momentum", [0.1, 0.01, "cumulative"])
def test_batchnorm_momentum_reaches_every_batchnorm_and_updates_as_pytorch_defines(momentum):
    model = build(make_spec(resnet_norm="batch", attention_norm="batch", out_norm="batch",
                            batchnorm_momentum=momentum))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    counts = count_module_types(model)
    # Two per resnet, one per attention (mid included), conv_norm_out.
    assert len(bns) == 2 * counts["ResnetBlock2D"] + counts["Attention"] + 1
    want = None if momentum == "cumulative" else momentum
    assert all(bn.momentum == want for bn in bns)
    # The running mean after three batches, against the update rule written out.
    bn = bns[0]
    torch.manual_seed(0)
    batches = [torch.randn(4, bn.num_features, 5, 5) + k for k in range(3)]
    running = torch.zeros(bn.num_features)
    for k, xb in enumerate(batches, start=1):
        bn(xb)
        m = xb.mean((0, 2, 3))
        weight = 1 / k if momentum == "cumulative" else momentum  # cumulative: the plain average
        running = (1 - weight) * running + weight * m
    torch.testing.assert_close(bn.running_mean, running)


def test_course_unet_takes_the_batchnorm_momentum():
    spec = build_spec({"id": "c", "model": {"family": "course", "batchnorm_momentum": "cumulative"}}, "test")
    bns = [m for m in build(spec).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(bn.momentum is None for bn in bns)
