"""What some spec fields really do to the model, as sentences for the site (torch-free).

The site renders without torch or diffusers, so these texts cannot live only beside the code that
builds the model (runner.models, runner.noise import both). They are the model owner's words: runner.models
and runner.noise should import CONV_FLAG_NOTE, ATTENTION_NORM_NOTE and describe_timestep from here.
"""

from __future__ import annotations

from runner.spec import NoiseSpec, Spec

CONV_FLAG_NOTE = (
    "The originals' 'Conv' flag replaced diffusers' LoRACompatibleConv layers with nn.Conv2d (and "
    "time_emb_proj's LoRACompatibleLinear with nn.Linear). Current diffusers builds plain nn.Conv2d and "
    "nn.Linear there already, so conv: conv2d is checked at build time (no LoRA* module, plain conv and "
    "linear classes in every resnet) and otherwise changes nothing: models with and without it are identical."
)

ATTENTION_NORM_NOTE = (
    "diffusers' attention processor flattens the feature map to (B, H*W, C) and calls "
    "attn.group_norm(h.transpose(1, 2)).transpose(1, 2), so the norm sees a (B, C, H*W) tensor. "
    "GroupNorm(32 groups) is the default; 'layer' puts LayerNorm([C, H*W]) there (statistics over each "
    "item's whole map), 'layer_channels' a LayerNorm over C alone at every position, 'batch' BatchNorm1d(C). "
    "Every Attention module is swapped, the mid block's included."
)


def describe_timestep(noise_spec: NoiseSpec, family: str) -> str:
    """One sentence for the site: what t the model receives under this noise spec and model family."""
    n = noise_spec.num_train_timesteps
    if noise_spec.schedule == "ddim":
        return f"The model receives the integer DDIM timestep t in [0, {n}) as is."
    if family == "course":
        return "The model receives the continuous cosine t in [0, 0.999] as is (its embedding expects 0..1)."
    if noise_spec.timestep_input == "scaled":
        return (f"The model receives the continuous cosine t scaled to [0, {n}) (t x {n}), "
                "the range its sinusoidal embedding was designed for.")
    return ("The model receives the continuous cosine t in [0, 0.999] as is, as the originals did, "
            f"although the diffusers timestep embedding is designed for 0..{n}.")


def model_notes(spec: Spec) -> list[str]:
    """The notes that apply to `spec`."""
    notes = [describe_timestep(spec.noise, spec.model.family)]
    if spec.model.conv == "conv2d":
        notes.append(CONV_FLAG_NOTE)
    if spec.model.family == "diffusers" and spec.model.attention_norm != "group":
        notes.append(ATTENTION_NORM_NOTE)
    return notes
