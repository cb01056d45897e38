"""Experiment specs: YAML files validated once, at load, into immutable typed objects.

A spec file is a mapping with four sections that follow the data flow (``data`` ->
``model`` -> ``noise`` -> ``train``) plus ``stats`` and free text for the site::

    extends: base.yaml          # optional, path relative to this file; overrides merge deeply
    title: BatchNorm in resnets
    notes: Why this variant exists.
    group: architecture
    model: {family: diffusers, block_out_channels: [32, 64, 64, 128], blocks: DAAA, resnet_norm: batch}
    train: {lr: 1e-3, batch_size: 32}

Every field has a default (documented where it is declared below), so a spec names only
what it changes. Profiles (``smoke``, ``quick``, ``full``) override dataset size and
epochs after inheritance is resolved; see ``PROFILES``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

# Ids become folder names and URLs: a conservative character set keeps them safe.
SAFE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")
BLOCK_LETTERS = {"D": "DownBlock2D", "A": "AttnDownBlock2D"}


class SpecError(ValueError):
    """A spec could not be loaded: the message names the file, each bad field and what was expected."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSpec(_Section):
    # Total items as the originals counted them ("10k" = 9000 train + 1000 valid rows).
    size: StrictInt = Field(10_000, gt=0)
    # Latents are multiplied by this before noise is added: 0.2 (fast.ai course) or 0.18215 (SD).
    scale: StrictFloat = Field(0.2, gt=0)
    # "none" is the originals' "nonorm"; "standardize" uses the train mean/std stored with the data.
    normalize: Literal["none", "standardize"] = "none"


class ModelSpec(_Section):
    family: Literal["diffusers", "course"] = "diffusers"
    block_out_channels: tuple[StrictInt, ...] = (32, 64, 64, 128)
    # One letter per down block: D = DownBlock2D, A = AttnDownBlock2D; up blocks mirror them.
    # Only for the diffusers family (the course UNet places attention by ``attention_start``).
    blocks: str | None = None
    layers_per_block: StrictInt = Field(2, gt=0)
    # Norm in every ResnetBlock2D (norm1/norm2): GroupNorm (diffusers default), BatchNorm2d, LayerNorm(C,H,W).
    resnet_norm: Literal["group", "batch", "layer"] = "group"
    # Norm before attention: GroupNorm, LayerNorm([C, H*W]), LayerNorm over channels only, BatchNorm1d(C).
    attention_norm: Literal["group", "layer", "layer_channels", "batch"] = "group"
    # The final norm before conv_out (the originals' "BN" runs swapped it for BatchNorm2d too).
    out_norm: Literal["group", "batch"] = "group"
    # zero_conv2: zero every resnet conv2 weight (the course's habit);
    # xavier_normal_relu: Xavier-normal with ReLU gain on those weights.
    init: Literal["default", "zero_conv2", "xavier_normal_relu"] = "zero_conv2"
    # The originals' "Conv" flag swapped LoRACompatibleConv for nn.Conv2d; current diffusers
    # already builds nn.Conv2d, so "conv2d" is checked at build time and otherwise changes nothing.
    conv: Literal["diffusers", "conv2d"] = "diffusers"
    # Course family only: level from which blocks get self-attention, and channels per head.
    attention_start: StrictInt | None = Field(None, ge=0)
    attention_head_dim: StrictInt | None = Field(None, gt=0)

    @field_validator("block_out_channels")
    @classmethod
    def _positive_channels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(c <= 0 for c in v):
            raise ValueError("expected a non-empty list of positive channel counts")
        return v

    @model_validator(mode="after")
    def _family_fields(self) -> ModelSpec:
        n = len(self.block_out_channels)
        if self.family == "diffusers":
            if self.blocks is None:
                # The diffusers default: plain first block, attention below it (DAAA for 4 levels).
                object.__setattr__(self, "blocks", "D" + "A" * (n - 1))
            bad = sorted(set(self.blocks) - set(BLOCK_LETTERS))
            if bad:
                raise ValueError(f"blocks: unknown block letter(s) {bad}; expected only D or A")
            if len(self.blocks) != n:
                raise ValueError(
                    f"blocks: {self.blocks!r} has {len(self.blocks)} letters but block_out_channels "
                    f"has {n} entries; expected one letter per down block"
                )
            for name in ("attention_start", "attention_head_dim"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}: only the course family uses it; remove it or set family: course"
                    )
        else:
            if self.blocks is not None:
                raise ValueError(
                    "blocks: the course family places attention with attention_start, not block letters"
                )
            for name in ("resnet_norm", "attention_norm", "out_norm", "conv"):
                if getattr(self, name) != ModelSpec.model_fields[name].default:
                    raise ValueError(
                        f"{name}: the course UNet has fixed layers (pre-activation BatchNorm); leave it unset"
                    )
            if self.attention_start is None:
                object.__setattr__(self, "attention_start", 2)
            if self.attention_head_dim is None:
                object.__setattr__(self, "attention_head_dim", 8)
            if self.attention_start >= n:
                raise ValueError(f"attention_start: expected a level below {n} (the number of levels)")
        return self

    @property
    def down_block_types(self) -> tuple[str, ...]:
        return tuple(BLOCK_LETTERS[c] for c in self.blocks or "")


class NoiseSpec(_Section):
    # cosine: continuous t ~ U(0, 0.999), alpha-bar = cos^2(t*pi/2); ddim: diffusers DDIMScheduler.
    schedule: Literal["cosine", "ddim"] = "cosine"
    # DDIM only; None keeps the scheduler's default (0.02).
    beta_end: StrictFloat | None = Field(None, gt=0, lt=1)
    num_train_timesteps: StrictInt = Field(1000, gt=0)
    # What the model receives as its timestep. "raw" is faithful: the originals passed the
    # cosine t in [0, 1) straight to the diffusers UNet (whose sinusoidal embedding expects
    # 0..1000). "scaled" multiplies it by num_train_timesteps for the diffusers family.
    timestep_input: Literal["raw", "scaled"] = "raw"

    @model_validator(mode="after")
    def _ddim_only(self) -> NoiseSpec:
        if self.schedule != "ddim" and self.beta_end is not None:
            raise ValueError("beta_end: only the ddim schedule uses it")
        return self


class TrainSpec(_Section):
    batch_size: StrictInt = Field(32, gt=0)
    lr: StrictFloat = Field(1e-3, gt=0)  # OneCycleLR max_lr
    adam_eps: StrictFloat = Field(1e-5, gt=0)
    weight_decay: StrictFloat = Field(0.01, ge=0)  # torch's AdamW default, as the originals ran
    epochs: StrictInt = Field(5, gt=0)
    # fp16 = autocast + gradient scaling as the originals ran on their GPU (CUDA only).
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    seed: StrictInt = 0
    # A run whose loss is non-finite, or exceeds this multiple of its early level, is stopped as diverged.
    divergence_factor: StrictFloat = Field(20.0, gt=1)
    checkpoint: Literal["none", "final"] = "none"
    # How the training forward runs: "none" eager; "default" or "reduce-overhead" through
    # torch.compile with that mode ("reduce-overhead" replays CUDA graphs, which removes the kernel
    # launch overhead of this small UNet on a GPU; on a CPU it compiles like "default" and gains
    # nothing). Statistics hooks stay eager either way (see runner.stats), validation stays eager.
    compile: Literal["none", "default", "reduce-overhead"] = "none"


class StatsSpec(_Section):
    # Which modules the hooks watch: residual blocks (the originals), attention blocks, or both.
    modules: Literal["resnets", "attention", "resnets+attention"] = "resnets"


class Spec(_Section):
    id: str
    title: str = ""
    notes: str = ""
    # Where a variant appears on the site: the insight page (`group`, e.g. "architecture" or
    # "hyperparameters") and the axis it varies there (e.g. "norm", "lr"), one table per axis.
    group: str = "other"
    axis: str = "other"
    # Profiles whose default suite runs this spec (``nox -s run_all`` with that profile).
    suites: tuple[Literal["smoke", "quick", "full"], ...] = ("quick", "full")
    profile: str = "full"
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    noise: NoiseSpec = NoiseSpec()
    train: TrainSpec = TrainSpec()
    stats: StatsSpec = StatsSpec()

    @field_validator("id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        if not SAFE_ID.match(v):
            raise ValueError(
                f"{v!r} is not a safe id; expected lowercase letters, digits, '_' or '-' (max 100)"
            )
        return v

    def content_hash(self) -> str:
        """Hash of everything that changes training (not title, notes, group or suites): the cache key."""
        payload = self.model_dump(mode="json", include={"data", "model", "noise", "train", "stats"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """Every resolved field as "section.field" -> value, for tables on pages and in notebooks."""
        out: dict[str, Any] = {}
        for key, value in self.model_dump(mode="json").items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def seed_name(self) -> str:
        return seed_name(self)


# ---------------------------------------------------------------- profiles

# Profiles override dataset size and epochs after inheritance; `full` keeps the spec's own
# (original) scale and precision (the originals ran fp16 on a GPU); the others train in fp32 so a
# CPU can run them. `quick` is sized for a 2-core CPU: 1800 items (1620 train) for 3 epochs is
# 150 optimiser steps at batch 32 (303 at batch 16). `smoke` is for tests: a few steps on a few latents.
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"data": {"size": 160}, "train": {"epochs": 1, "precision": "fp32"}},
    "quick": {"data": {"size": 1800}, "train": {"epochs": 3, "precision": "fp32"}},
    "full": {},
}


# ---------------------------------------------------------------- YAML loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.2), where YAML 1.1 gives a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of fields at the top level, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve_extends(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise SpecError(f"{chain[-1]}: extends: cyclic inheritance ({cycle}); expected a chain that ends")
    raw = _read_yaml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise SpecError(f"{path}: extends: expected a file name (string), got {parent!r}")
    return _merge(_resolve_extends(path.parent / parent, (*chain, path)), raw)


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


_SECTIONS = {"data": DataSpec, "model": ModelSpec, "noise": NoiseSpec, "train": TrainSpec, "stats": StatsSpec}


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        section = _SECTIONS.get(str(err["loc"][0])) if len(err["loc"]) > 1 else Spec
        known = _field_names(section) if section else []
        hint = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        guess = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"{loc}: unknown field{guess} (expected one of: {', '.join(known)})"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    return f"{loc}: {msg}" if isinstance(got, dict) else f"{loc}: {msg} (got {got!r})"


def build_spec(raw: dict[str, Any], source: str, profile: str = "full") -> Spec:
    """Validate a resolved mapping into a Spec, applying `profile`; errors name `source`."""
    if profile not in PROFILES:
        raise SpecError(f"{source}: profile: unknown profile {profile!r}; expected one of {sorted(PROFILES)}")
    raw = _merge(raw, PROFILES[profile])
    raw["profile"] = profile
    try:
        return Spec.model_validate(raw)
    except ValidationError as e:
        lines = "\n".join(f"  {_describe(err)}" for err in e.errors())
        raise SpecError(f"{source}: invalid spec\n{lines}") from None


def load_spec(path: str | Path, profile: str = "full") -> Spec:
    """Load, inherit, validate. The id is the file name's stem and must be a safe name."""
    path = Path(path)
    raw = _resolve_extends(path)
    if "id" in raw:
        raise SpecError(f"{path}: id: the id comes from the file name; remove the field")
    if not SAFE_ID.match(path.stem):
        raise SpecError(
            f"{path}: id: file name {path.stem!r} is not a safe id; "
            "expected lowercase letters, digits, '_' or '-'"
        )
    return build_spec({**raw, "id": path.stem}, str(path), profile)


def load_resolved(path: str | Path) -> Spec:
    """Load a resolved spec written by `Spec.to_yaml` (the copy saved with every run)."""
    path = Path(path)
    raw = _read_yaml(path)
    try:
        return Spec.model_validate(raw)
    except ValidationError as e:
        lines = "\n".join(f"  {_describe(err)}" for err in e.errors())
        raise SpecError(f"{path}: invalid resolved spec\n{lines}") from None


def discover(folder: str | Path) -> list[Path]:
    """Spec files under `folder` (recursively), skipping `_`-prefixed bases meant only for `extends`."""
    return sorted(p for p in Path(folder).rglob("*.yaml") if not p.name.startswith("_"))


# ---------------------------------------------------------------- original notebook names
#
# The originals named notebooks like
#   image_generator_(32,32,64,64,128)_(DAAAA)_InitXavierNormRelu_Conv_BN_Bs16_Lr2e-4_10k_60e.ipynb
# Tokens after the two parenthesised groups are optional. Missing tokens take the defaults of
# those notebooks: zero conv2 init ("NoInit" = diffusers default init), diffusers convs,
# GroupNorm, batch 32, lr 1e-3, 10k latents, 5 epochs; they all ran DDIM noise
# (beta_end 0.01) on latents x 0.18215 in mixed precision.

SEED_DEFAULTS = {"batch_size": 32, "lr": 1e-3, "size": 10_000, "epochs": 5}
_INIT_TOKENS = {"InitXavierNormRelu": "xavier_normal_relu", "NoInit": "default"}


def _format_lr(lr: float) -> str:
    mantissa, exponent = f"{lr:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _format_size(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _parse_size(token: str) -> int:
    return int(token[:-1]) * 1000 if token.endswith("k") else int(token)


def from_seed_name(name: str, profile: str = "full") -> Spec:
    """The spec an original notebook name describes; `spec.seed_name()` gives the name back."""
    stem = name.removesuffix(".ipynb").removeprefix("image_generator_")
    m = re.fullmatch(r"\(([\d,\s]+)\)_\(([A-Za-z]+)\)((?:_[A-Za-z0-9.+-]+)*)", stem)
    if not m:
        raise SpecError(
            f"{name}: not an original notebook name; expected '(32,64,64,128)_(DAAA)[_Token...]' "
            "with optional tokens InitXavierNormRelu|NoInit, Conv, BN, Bs<n>, Lr<x>, <n>k, <n>e"
        )
    channels = [int(c) for c in m.group(1).split(",")]
    model: dict[str, Any] = {"block_out_channels": channels, "blocks": m.group(2)}
    train: dict[str, Any] = {"precision": "fp16"}
    data: dict[str, Any] = {"scale": 0.18215}
    for token in filter(None, m.group(3).split("_")):
        try:
            if token in _INIT_TOKENS:
                model["init"] = _INIT_TOKENS[token]
            elif token == "Conv":
                model["conv"] = "conv2d"
            elif token == "BN":
                model["resnet_norm"] = model["out_norm"] = "batch"
            elif token.startswith("Bs"):
                train["batch_size"] = int(token[2:])
            elif token.startswith("Lr"):
                train["lr"] = float(token[2:])
            elif re.fullmatch(r"\d+k?", token):
                data["size"] = _parse_size(token)
            elif re.fullmatch(r"\d+e", token):
                train["epochs"] = int(token[:-1])
            else:
                raise ValueError
        except ValueError:
            raise SpecError(f"{name}: unknown token {token!r} in an original notebook name") from None
    raw = {
        "id": _slug(stem),
        "title": stem,
        "notes": f"Built from the original notebook name {stem}.",
        "data": {**{"size": SEED_DEFAULTS["size"]}, **data},
        "model": model,
        "noise": {"schedule": "ddim", "beta_end": 0.01},
        "train": {**{k: SEED_DEFAULTS[k] for k in ("batch_size", "lr", "epochs")}, **train},
    }
    return build_spec(raw, name, profile)


def _slug(stem: str) -> str:
    # "(32,64)_(DA)_Lr1e-3" -> "32-64_da_lr1e-3": parentheses dropped, commas become dashes.
    slug = stem.lower().replace("(", "").replace(")", "").replace(",", "-")
    return re.sub(r"[^a-z0-9_-]+", "-", slug).strip("-_")[:100]


def seed_name(spec: Spec) -> str:
    m, t, d = spec.model, spec.train, spec.data
    if m.family != "diffusers":
        raise SpecError(f"{spec.id}: only diffusers-family specs have an original notebook name")
    tokens = [f"({','.join(map(str, m.block_out_channels))})", f"({m.blocks})"]
    tokens += [tok for tok, init in _INIT_TOKENS.items() if init == m.init]
    if m.conv == "conv2d":
        tokens.append("Conv")
    if m.resnet_norm == "batch":
        tokens.append("BN")
    if t.batch_size != SEED_DEFAULTS["batch_size"]:
        tokens.append(f"Bs{t.batch_size}")
    tokens += [f"Lr{_format_lr(t.lr)}", _format_size(d.size), f"{t.epochs}e"]
    return "_".join(tokens)
