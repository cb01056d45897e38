"""Experiment specs: YAML files validated once, at load, into immutable typed objects.

A spec file is a mapping with four sections that follow the data flow (``data`` ->
``model`` -> ``noise`` -> ``train``) plus ``stats`` and free text for the site::

    extends: base.yaml          # optional, path relative to this file; overrides merge deeply
    title: BatchNorm in resnets
    notes: Why this variant exists.
    group: architecture
    model: {family: diffusers, block_out_channels: [32, 64, 64, 128], blocks: DAAA, resnet_norm: batch}
    train: {lr: 1e-3, batch_size: 32}

Every field has a default and a documented range (the ``description`` of each field below;
``field_reference()`` lists them), so a spec names only what it changes. Profiles (``smoke``,
``quick``, ``full``) override dataset size and epochs after inheritance is resolved; see ``PROFILES``.

Specs come from contributors, so loading trusts nothing: YAML is read by YAML 1.2 rules (integers
with leading zeros are refused, ``yes``/``1:30`` are strings), duplicate keys, aliases, empty files
and files over ``MAX_SPEC_BYTES`` are refused, and ``extends`` reaches only ``.yaml`` files inside
``experiments/`` or the loaded spec's own folder tree, at most ``MAX_EXTENDS_DEPTH`` files deep.
Every refusal is a ``SpecError`` of one line: the file holding the bad line, the field, what was
expected, and at most a short quoted excerpt of what was found.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    confloat,
    field_validator,
    model_validator,
)

from runner.datafolder import DATA_DIR, capacity, split_sizes

# Ids become folder names and URLs: a conservative character set keeps them safe.
SAFE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")
BLOCK_LETTERS = {"D": "DownBlock2D", "A": "AttnDownBlock2D"}
EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
MAX_SPEC_BYTES = 64 * 1024  # the largest spec in experiments/ is under 1 KiB
MAX_EXTENDS_DEPTH = 16  # files in one extends chain, the spec itself included
MAX_NESTING = 8  # YAML collection depth; a spec needs 3 (top level, section, channel list)
EXCERPT_CHARS = 40  # the most of any value found in a file that an error message repeats
# The diffusers UNet is built with GroupNorm(32 groups) everywhere before any norm is swapped.
DIFFUSERS_NORM_GROUPS = 32
LEVELS = (1, 6)  # 32x32 latents halve at every level but the last: 6 levels reach 1x1
CHANNELS = (1, 1024)

FiniteFloat = confloat(strict=True, allow_inf_nan=False)


class SpecError(ValueError):
    """A spec could not be loaded: the message names the file, each bad field and what was expected."""


def _num_text(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) < 1e12 else f"{x:g}"


def _range_text(gt: float | None, ge: float | None, lt: float | None, le: float | None) -> str:
    if ge is not None and le is not None:
        return f"{_num_text(ge)} to {_num_text(le)}"
    low = f"> {_num_text(gt)}" if gt is not None else f">= {_num_text(ge)}" if ge is not None else ""
    high = f"< {_num_text(lt)}" if lt is not None else f"<= {_num_text(le)}" if le is not None else ""
    return " and ".join(filter(None, (low, high))) or "any"


def _number(default: Any, doc: str, *, gt: float | None = None, ge: float | None = None,
            lt: float | None = None, le: float | None = None) -> Any:
    """A numeric field whose description ends with its range: checks and docs read the same bounds."""
    text = f"{doc} Range: {_range_text(gt, ge, lt, le)}."
    return Field(default, gt=gt, ge=ge, lt=lt, le=le, description=text)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSpec(_Section):
    size: StrictInt = _number(
        10_000,
        "Total items as the originals counted them ('10k' = 9000 train + 1000 valid rows); at most "
        "what the data folder holds, at least 5 so the valid split gets one.",
        ge=5, le=10_000_000,
    )
    scale: FiniteFloat = _number(
        0.2,
        "Latents are multiplied by this before noise is added: 0.2 (fast.ai course) or 0.18215 (SD).",
        gt=0, le=100,
    )
    # "none" is the originals' "nonorm"; "standardize" uses the train mean/std stored with the data.
    normalize: Literal["none", "standardize"] = "none"


class ModelSpec(_Section):
    family: Literal["diffusers", "course"] = "diffusers"
    block_out_channels: tuple[StrictInt, ...] = Field(
        (32, 64, 64, 128),
        description=f"Channels per level. Range: {LEVELS[0]} to {LEVELS[1]} levels of {CHANNELS[0]} to "
        f"{CHANNELS[1]} channels; multiples of {DIFFUSERS_NORM_GROUPS} for the diffusers family, of "
        "attention_head_dim at the course family's attention levels.",
    )
    # One letter per down block: D = DownBlock2D, A = AttnDownBlock2D; up blocks mirror them.
    # Only for the diffusers family (the course UNet places attention by ``attention_start``).
    blocks: str | None = Field(None, max_length=LEVELS[1])
    layers_per_block: StrictInt = _number(2, "Resnet blocks per down level.", ge=1, le=8)
    # Norm in every ResnetBlock2D (norm1/norm2): GroupNorm (diffusers default), BatchNorm2d, LayerNorm(C,H,W).
    resnet_norm: Literal["group", "batch", "layer"] = "group"
    # Norm before attention: GroupNorm, LayerNorm([C, H*W]), LayerNorm over channels only, BatchNorm1d(C).
    attention_norm: Literal["group", "layer", "layer_channels", "batch"] = "group"
    # The final norm before conv_out (the originals' "BN" runs swapped it for BatchNorm2d too).
    out_norm: Literal["group", "batch"] = "group"
    # zero_conv2: zero every resnet conv2 weight (the course's habit);
    # xavier_normal_relu: Xavier-normal with ReLU gain on those weights;
    # xavier_normal_relu_conv1_conv2: the same on conv1 and conv2 (the InitUpg original; diffusers only).
    init: Literal[
        "default", "zero_conv2", "xavier_normal_relu", "xavier_normal_relu_conv1_conv2"
    ] = "zero_conv2"
    # Every BatchNorm's running-statistics update: a momentum in (0, 1] (PyTorch's default 0.1, as the
    # originals ran), or "cumulative" for an equal-weight average of all batches (PyTorch's momentum=None).
    # Only for models with a BatchNorm (the course UNet, or a diffusers norm set to "batch").
    batchnorm_momentum: FiniteFloat | Literal["cumulative"] = 0.1
    # The originals' "Conv" flag swapped LoRACompatibleConv for nn.Conv2d; current diffusers
    # already builds nn.Conv2d, so "conv2d" is checked at build time and otherwise changes nothing.
    conv: Literal["diffusers", "conv2d"] = "diffusers"
    # Course family only: level from which blocks get self-attention, and channels per head.
    attention_start: StrictInt | None = _number(
        None,
        "Course family: first level with self-attention (default 2); below the number of levels.",
        ge=0, le=LEVELS[1] - 1,
    )
    attention_head_dim: StrictInt | None = _number(
        None,
        "Course family: channels per attention head (default 8).",
        ge=1, le=CHANNELS[1],
    )

    @field_validator("block_out_channels")
    @classmethod
    def _positive_channels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not LEVELS[0] <= len(v) <= LEVELS[1] or any(not CHANNELS[0] <= c <= CHANNELS[1] for c in v):
            raise ValueError(
                f"expected {LEVELS[0]} to {LEVELS[1]} positive channel counts of at most {CHANNELS[1]}"
            )
        return v

    @field_validator("batchnorm_momentum")
    @classmethod
    def _momentum_range(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError("expected a momentum in (0, 1] or 'cumulative'")
        return v

    @property
    def has_batchnorm(self) -> bool:
        return self.family == "course" or "batch" in (self.resnet_norm, self.attention_norm, self.out_norm)

    @model_validator(mode="after")
    def _family_fields(self) -> ModelSpec:
        n = len(self.block_out_channels)
        if self.batchnorm_momentum != 0.1 and not self.has_batchnorm:
            raise ValueError(
                "batchnorm_momentum: this model has no BatchNorm layer; set a norm to 'batch' or remove it"
            )
        if self.family == "diffusers":
            if self.blocks is None:
                # The diffusers default: plain first block, attention below it (DAAA for 4 levels).
                object.__setattr__(self, "blocks", "D" + "A" * (n - 1))
            bad = sorted(set(self.blocks) - set(BLOCK_LETTERS))
            if bad:
                raise ValueError(f"blocks: unknown block letter(s) {_excerpt(bad)}; expected only D or A")
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
            why = f"the diffusers UNet builds GroupNorm({DIFFUSERS_NORM_GROUPS} groups) in every block"
            self._channels_divisible(range(n), DIFFUSERS_NORM_GROUPS, f"{why}, whatever norm replaces it")
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
            if self.init == "xavier_normal_relu_conv1_conv2":
                raise ValueError("init: xavier_normal_relu_conv1_conv2 is for the diffusers family only")
            if self.attention_start is None:
                object.__setattr__(self, "attention_start", 2)
            if self.attention_head_dim is None:
                object.__setattr__(self, "attention_head_dim", 8)
            if self.attention_start >= n:
                raise ValueError(f"attention_start: expected a level below {n} (the number of levels)")
            why = "attention splits each level's channels into heads of attention_head_dim"
            self._channels_divisible(range(self.attention_start, n), self.attention_head_dim, why)
        return self

    def _channels_divisible(self, levels: range, divisor: int, why: str) -> None:
        for level in levels:
            if self.block_out_channels[level] % divisor:
                raise ValueError(
                    f"block_out_channels: expected multiples of {divisor} ({why}); "
                    f"got {self.block_out_channels[level]} at level {level}"
                )

    @property
    def down_block_types(self) -> tuple[str, ...]:
        return tuple(BLOCK_LETTERS[c] for c in self.blocks or "")


class NoiseSpec(_Section):
    # cosine: continuous t ~ U(0, 0.999), alpha-bar = cos^2(t*pi/2); ddim: diffusers DDIMScheduler.
    schedule: Literal["cosine", "ddim"] = "cosine"
    beta_end: FiniteFloat | None = _number(
        None,
        "DDIM only; unset keeps the scheduler's default (0.02).",
        gt=0, lt=1,
    )
    num_train_timesteps: StrictInt = _number(
        1000,
        "DDIM schedule length, and the factor of timestep_input: scaled.",
        ge=1, le=100_000,
    )
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
    batch_size: StrictInt = _number(
        32,
        "Items per optimiser step; at most the train split.",
        ge=1, le=4096,
    )
    lr: FiniteFloat = _number(1e-3, "OneCycleLR max_lr; large values study divergence.", gt=0, le=1e4)
    adam_eps: FiniteFloat = _number(1e-5, "AdamW eps.", gt=0, le=1)
    weight_decay: FiniteFloat = _number(
        0.01,
        "AdamW weight decay (torch's default, as the originals ran).",
        ge=0, le=1,
    )
    epochs: StrictInt = _number(5, "Passes over the train split (the OneCycle length).", ge=1, le=10_000)
    # Stop after this many epochs of the `epochs`-long OneCycle schedule (the lr at every step is the full
    # schedule's): a long run's early phase on a short budget. Unset runs the whole schedule.
    stop_after_epochs: StrictInt | None = _number(
        None,
        "Stop after this many epochs of the `epochs`-long schedule; unset runs all of it.",
        ge=1, le=10_000,
    )
    # The last, smaller batch of each epoch: "keep" trains on it, as the originals' DataLoader did
    # (9,000 rows at batch 32 = 282 steps, the last of 8 rows); "drop" skips it (281 steps).
    last_batch: Literal["keep", "drop"] = "keep"
    # fp32: no autocast. fp16: autocast + a gradient scaler, as the course UNet's originals ran.
    # fp16_unscaled: autocast, no scaler, as the Diffusers originals ran (their learner overrode
    # backward and step). bf16: autocast, no scaler. fp16 modes need CUDA. See PRECISION_NOTES.
    precision: Literal["fp32", "fp16", "fp16_unscaled", "bf16"] = "fp32"
    seed: StrictInt = _number(0, "Seeds the model init and the batch order.", ge=0, le=2**32 - 1)
    divergence_factor: FiniteFloat = _number(
        20.0,
        "A run whose loss is non-finite, or exceeds this multiple of its early level, is stopped as "
        "diverged.",
        gt=1, le=1e6,
    )
    checkpoint: Literal["none", "final"] = "none"
    # How the training forward runs: "none" eager; "default" or "reduce-overhead" through
    # torch.compile with that mode ("reduce-overhead" replays CUDA graphs, which removes the kernel
    # launch overhead of this small UNet on a GPU; on a CPU it compiles like "default" and gains
    # nothing). Statistics hooks stay eager either way (see runner.stats), validation stays eager.
    compile: Literal["none", "default", "reduce-overhead"] = "none"

    @model_validator(mode="after")
    def _stop_within_schedule(self) -> TrainSpec:
        if self.stop_after_epochs is not None and self.stop_after_epochs >= self.epochs:
            raise ValueError(
                f"stop_after_epochs: expected fewer than train.epochs ({self.epochs}); "
                "leave it unset to run the whole schedule"
            )
        return self

    @property
    def epochs_run(self) -> int:
        """Epochs actually trained: `stop_after_epochs` of the schedule, or all of it."""
        return self.stop_after_epochs or self.epochs


class StatsSpec(_Section):
    # Which modules the hooks watch: residual blocks (the originals), attention blocks, or both.
    modules: Literal["resnets", "attention", "resnets+attention"] = "resnets"


class SampleSpec(_Section):
    # DDIM steps for the 16 samples drawn after training; the smoke and quick profiles lower it.
    steps: StrictInt = _number(100, "DDIM steps for the samples drawn after training.", ge=1, le=10_000)
    # matched: the schedule and timestep input the model trained with (eta 0). originals: as the
    # originals sampled, DDIMScheduler(beta_end=0.01) with integer t and eta 1 (a mismatch for cosine).
    samplers: tuple[Literal["matched", "originals"], ...] = ("matched",)

    @field_validator("samplers")
    @classmethod
    def _distinct_samplers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError("expected a non-empty list of distinct samplers (matched, originals)")
        return v


class Spec(_Section):
    id: str
    title: str = Field("", max_length=200, description="Page title. At most 200 characters.")
    notes: str = Field("", max_length=5000, description="Why the variant exists. At most 5,000 characters.")
    # Where a variant appears on the site: the insight page (`group`, e.g. "architecture" or
    # "hyperparameters") and the axis it varies there (e.g. "norm", "lr"), one table per axis.
    group: str = Field("other", min_length=1, max_length=60, description="Insight page; 1 to 60 chars.")
    axis: str = Field("other", min_length=1, max_length=60, description="Its table there; 1 to 60 chars.")
    # Profiles whose default suite runs this spec (``nox -s run_all`` with that profile).
    suites: tuple[Literal["smoke", "quick", "full"], ...] = ("quick", "full")
    # The original notebook this spec reproduces (its name without .ipynb, as headed in the originals'
    # printed losses); for a notebook that trained several segments, the first segment. None: no notebook.
    reproduces: str | None = Field(
        None, max_length=200, description="The original notebook it reproduces. At most 200 characters."
    )
    profile: str = "full"
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    noise: NoiseSpec = NoiseSpec()
    train: TrainSpec = TrainSpec()
    stats: StatsSpec = StatsSpec()
    sample: SampleSpec = SampleSpec()

    @field_validator("id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        if not SAFE_ID.match(v):
            raise ValueError(
                f"{_excerpt(v)} is not a safe id; expected lowercase letters, digits, '_' or '-' (max 100)"
            )
        return v

    @model_validator(mode="after")
    def _batch_fits(self) -> Spec:
        n_train, _ = split_sizes(self.data.size)
        if self.train.batch_size > n_train:
            raise ValueError(
                f"train.batch_size: {self.train.batch_size} is more than the {n_train} train items of "
                f"data.size {self.data.size} (profile {self.profile}); expected at most {n_train}, "
                "so that every step sees a full batch at least once"
            )
        return self

    def content_hash(self) -> str:
        """Hash of everything that changes a run's files (not title, notes, group, suites): the cache key."""
        # `sample` is included: the run folder's samples come from it.
        sections = {"data", "model", "noise", "train", "stats", "sample"}
        payload = self.model_dump(mode="json", include=sections)
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
        return yaml.dump(self.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False)

    def seed_name(self) -> str:
        return seed_name(self)


_SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataSpec, "model": ModelSpec, "noise": NoiseSpec, "train": TrainSpec, "stats": StatsSpec,
    "sample": SampleSpec,
}


def field_reference() -> list[tuple[str, str]]:
    """("section.field", description) for every documented spec field, for the README and the site."""
    rows = [(name, f.description) for name, f in Spec.model_fields.items() if f.description]
    for section, model in _SECTIONS.items():
        fields = model.model_fields.items()
        rows += [(f"{section}.{name}", f.description) for name, f in fields if f.description]
    return rows


# ---------------------------------------------------------------- profiles

# Profiles override dataset size and epochs after inheritance; `full` keeps the spec's own
# (original) scale and precision (the originals ran fp16 on a GPU); the others train in fp32 so a
# CPU can run them, and run their whole short schedule (no stop_after_epochs). `quick` is sized for a
# 2-core CPU: 1800 items (1620 train) for 3 epochs is 153 optimiser steps at batch 32 (51 per epoch,
# the last of 20 rows; 303 at batch 16). `smoke` is for tests: a few steps on a few latents.
# Samples: 3 DDIM steps (smoke), 20 (quick: about 10 s per sampler on one CPU thread), the spec's own (full).
_SHORT = {"precision": "fp32", "stop_after_epochs": None}
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {"data": {"size": 160}, "train": {"epochs": 1, **_SHORT}, "sample": {"steps": 3}},
    "quick": {"data": {"size": 1800}, "train": {"epochs": 3, **_SHORT}, "sample": {"steps": 20}},
    "full": {},
}

# What each train.precision runs and why a spec uses it: the text the spec pages show.
PRECISION_NOTES: dict[str, str] = {
    "fp32": "fp32: no autocast and no gradient scaler; every value is float32.",
    "fp16": (
        "fp16 (scaled): float16 autocast with a dynamic gradient scaler, which multiplies the loss before "
        "backward, unscales the gradients before the step and skips a step whose gradients overflow. "
        "This is how the course UNet's originals ran (miniai's mixed-precision callback)."
    ),
    "fp16_unscaled": (
        "fp16 unscaled: float16 autocast with no gradient scaler, so small gradients can underflow to zero "
        "and a step with overflowing gradients is taken. This is how the Diffusers originals ran: their "
        "learner overrode backward and step, so miniai's mixed-precision callback never scaled the loss."
    ),
    "bf16": (
        "bf16: bfloat16 autocast with no gradient scaler (bfloat16 has float32's exponent range). "
        "No original ran it."
    ),
}


def describe_precision(spec: Spec) -> str:
    """Which precision mode the run used and why: the mode's note, plus the profile's override if any."""
    note = PRECISION_NOTES[spec.train.precision]
    if spec.profile != "full" and "precision" in PROFILES[spec.profile].get("train", {}):
        note += (
            f" The {spec.profile} profile trains every spec in {spec.train.precision} so a CPU can run it; "
            "the spec's own precision runs at the full profile."
        )
    return note


# ---------------------------------------------------------------- messages


def _excerpt(value: Any) -> str:
    """A short, quoted, one-line rendering of a value read from a file (never the whole of it)."""
    try:
        text = repr(value)
    except ValueError:  # ints past Python's digit limit refuse repr
        text = f"<{type(value).__name__} too long to show>"
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 4] + "...'"


def _name(key: Any) -> str:
    """A mapping key as it appears in a field path: plain when it looks like a name, else an excerpt."""
    plain = isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,39}", key)
    return key if plain else _excerpt(key)


def _shown(path: Path) -> str:
    """A path for messages: relative to the working directory when inside it, printable always."""
    try:
        text = str(path.relative_to(Path.cwd())) if path.is_absolute() else str(path)
    except ValueError:
        text = str(path)
    return text


def _one_line(text: str) -> str:
    """Escape anything that could break the one-line message (newlines, U+2028, control characters)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fail(path: Path | str, field: str, message: str) -> SpecError:
    where = _shown(path) if isinstance(path, Path) else path
    return SpecError(_one_line(f"{where}: {field}: {message}"))


# ---------------------------------------------------------------- YAML 1.2 reading


class _Resolver(yaml.resolver.BaseResolver):
    """YAML 1.2 core schema: only true/false are booleans, `010` is refused, `1:30` and `yes` are text."""

    yaml_implicit_resolvers: dict[str, list[Any]] = {}


_LEADING_ZERO = "tag:runner,2026:leading-zero-int"
_IMPLICIT = [
    ("tag:yaml.org,2002:null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    # YAML 1.1 read 010 as octal 8; YAML 1.2 as 10. Both are plausible intents, so neither is guessed.
    (_LEADING_ZERO, r"[-+]?0[0-9_]+", list("-+0")),
    ("tag:yaml.org,2002:int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", list("-+0123456789")),
    (
        "tag:yaml.org,2002:float",
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        list("-+.0123456789"),
    ),
]
for _tag, _pattern, _first in _IMPLICIT:
    _Resolver.add_implicit_resolver(_tag, re.compile(f"^(?:{_pattern})$"), _first)


class _Loader(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    yaml.composer.Composer,
    yaml.constructor.SafeConstructor,
    _Resolver,
):
    """A safe loader that refuses aliases, deep nesting, duplicate keys and YAML 1.1 integer forms."""

    yaml_constructors = dict(yaml.constructor.SafeConstructor.yaml_constructors)

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        _Resolver.__init__(self)
        self._depth = 0

    def fetch_flow_collection_start(self, token_class: Any) -> None:
        # Checked while scanning: deep [[[... makes PyYAML's scanner quadratic before composing starts.
        if self.flow_level >= MAX_NESTING:
            mark = self.get_mark()
            raise yaml.scanner.ScannerError(None, None, f"nested deeper than {MAX_NESTING} levels", mark)
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            # An alias can expand to itself many times over (a "billion laughs"): write values out.
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in specs; write the value out", event.start_mark
            )
        self._depth += 1
        if self._depth > MAX_NESTING:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_NESTING} levels", event.start_mark
            )
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "expected a field name as the key", key_node.start_mark
                ) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_excerpt(key)}; expected each key once", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _construct_int(loader: _Loader, node: Any) -> int:
    text = loader.construct_scalar(node)
    if re.fullmatch(r"[-+]?[0-9]{1,30}", text):
        return int(text)
    if re.fullmatch(r"0o[0-7]{1,30}|0x[0-9a-fA-F]{1,30}", text):
        return int(text, 0)
    raise yaml.constructor.ConstructorError(
        None, None, f"expected a YAML 1.2 integer of at most 30 digits, got {_excerpt(text)}", node.start_mark
    )


def _construct_float(loader: _Loader, node: Any) -> float:
    text = loader.construct_scalar(node)
    special = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
    if text.lower() in special:
        return special[text.lower()]
    try:
        return float(text)
    except ValueError:
        raise yaml.constructor.ConstructorError(
            None, None, f"expected a number, got {_excerpt(text)}", node.start_mark
        ) from None


def _refuse_leading_zero(loader: _Loader, node: Any) -> None:
    raise yaml.constructor.ConstructorError(
        None,
        None,
        f"{node.value[:20]} has a leading zero, which YAML 1.1 reads as octal and YAML 1.2 as decimal; "
        "write the number without it, or quote it for text",
        node.start_mark,
    )


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Loader.add_constructor(_LEADING_ZERO, _refuse_leading_zero)


class _Dumper(yaml.SafeDumper):
    """Quotes exactly the strings that `_Loader` would not read back as strings."""

    yaml_implicit_resolvers = _Resolver.yaml_implicit_resolvers


_KEY = r"([A-Za-z_][A-Za-z0-9_]{0,39})\s*:"


def _field_at(text: str, line: int, column: int) -> str:
    """The field a YAML error at 0-based (line, column) sits in: its top-level key and, when the error
    is inside that key's block or flow mapping, the nearest key before it ("train.lr")."""
    rows = text.split("\n")
    top = next((m.group(1) for row in reversed(rows[: line + 1]) if (m := re.match(_KEY, row))), None)
    if top is None:
        return "(top level)"
    row = rows[line] if line < len(rows) else ""
    at = re.match(_KEY, row[column:])  # an error on a key itself (a duplicate) names that key
    inner = re.findall(_KEY, row[:column]) + ([at.group(1)] if at else [])
    starts_top = re.match(_KEY, row) is not None
    nested = inner[1:] if starts_top else inner
    return f"{top}.{nested[-1]}" if nested else top


def _yaml_error(path: Path, text: str, e: yaml.YAMLError) -> SpecError:
    if isinstance(e, yaml.reader.ReaderError):
        line = text.count("\n", 0, e.position)
        column = e.position - (text.rfind("\n", 0, e.position) + 1)
        return _fail(path, _field_at(text, line, column), f"line {line + 1}: not valid YAML: {e.reason}")
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = str(getattr(e, "problem", None) or getattr(e, "context", None) or type(e).__name__)
    # PyYAML's own message quotes the offending lines; only its one-line problem is kept.
    problem = problem if len(problem) <= 200 and problem.isprintable() else _excerpt(problem)
    if mark is None:
        return _fail(path, "(top level)", f"not valid YAML: {problem}")
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    return _fail(path, _field_at(text, mark.line, mark.column), f"{where}: not valid YAML: {problem}")


def _read_text(path: Path, referrer: Path | None) -> str:
    """The file's text, refusing what is missing, not a regular file, too large or not UTF-8."""
    try:
        info = path.stat()
    except FileNotFoundError:
        if referrer is not None:
            written = os.path.relpath(path, referrer.parent)
            raise _fail(referrer, "extends", f"no such spec file {_excerpt(written)}") from None
        raise _fail(path, "(file)", "no such spec file") from None
    except (OSError, ValueError) as e:
        field = "extends" if referrer else "(file)"
        raise _fail(referrer or path, field, f"cannot open ({type(e).__name__})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise _fail(path, "(file)", f"is {kind}; expected a .yaml spec file")
    if info.st_size > MAX_SPEC_BYTES:
        raise _fail(path, "(file)", f"{info.st_size} bytes; expected at most {MAX_SPEC_BYTES} bytes")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise _fail(path, "(file)", f"cannot read ({e.strerror or type(e).__name__})") from None
    if len(data) > MAX_SPEC_BYTES:
        raise _fail(path, "(file)", f"expected a spec of at most {MAX_SPEC_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, "(file)", f"not UTF-8 text (invalid byte at offset {e.start})") from None


def _read_yaml(path: Path, referrer: Path | None = None) -> dict[str, Any]:
    """One spec file as a non-empty mapping; every failure is a one-line SpecError naming `path`."""
    text = _read_text(path, referrer)
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeConstructor
    except yaml.YAMLError as e:
        raise _yaml_error(path, text, e) from None
    if data is None or data == {}:
        # An empty spec would silently train every default.
        raise _fail(path, "(top level)", "empty spec; expected a mapping of at least one field")
    if not isinstance(data, dict):
        raise _fail(path, "(top level)", f"expected a mapping of fields, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


Origins = dict[tuple[Any, ...], Path]


def _record_origins(raw: dict[str, Any], file: Path, origins: Origins, prefix: tuple[Any, ...] = ()) -> None:
    """Note which file set each field (a later, child file overrides), so errors name that file."""
    for k, v in raw.items():
        origins[(*prefix, k)] = file
        if isinstance(v, dict):
            _record_origins(v, file, origins, (*prefix, k))


def _parent_path(child: Path, value: Any, roots: tuple[Path, ...]) -> Path:
    """Where `extends: value` in `child` points, refusing anything but a .yaml file inside `roots`."""
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise _fail(child, "extends", f"expected a .yaml file relative to this file, got {_excerpt(value)}")
    target = child.parent / value
    try:
        resolved = target.resolve()
    except (OSError, RuntimeError, ValueError):
        raise _fail(child, "extends", f"cannot resolve {_excerpt(value)}") from None
    if target.suffix != ".yaml" or resolved.suffix != ".yaml":
        raise _fail(child, "extends", f"{_excerpt(value)} is not a .yaml file; expected a spec file")
    if not any(resolved.is_relative_to(root) for root in roots):
        allowed = " or ".join(_shown(r) for r in roots)
        raise _fail(child, "extends", f"{_excerpt(value)} is outside {allowed}; expected a spec inside them")
    return resolved


def _resolve_extends(path: Path) -> tuple[dict[str, Any], Origins]:
    """The spec at `path` merged over its `extends` chain (no recursion), and each field's file."""
    roots = tuple(dict.fromkeys((path.resolve().parent, EXPERIMENTS_DIR.resolve())))
    chain: list[tuple[Path, dict[str, Any]]] = []
    current: Path = path
    referrer: Path | None = None
    while True:
        raw = _read_yaml(current, referrer)
        chain.append((current, raw))
        parent = raw.pop("extends", None)
        if parent is None:
            break
        if len(chain) >= MAX_EXTENDS_DEPTH:
            raise _fail(current, "extends", f"more than {MAX_EXTENDS_DEPTH} files in the chain")
        referrer, current = current, _parent_path(current, parent, roots)
        seen = [p.resolve() for p, _ in chain]
        if current in seen:
            cycle = " -> ".join(p.name for p in (*seen, current))
            raise _fail(referrer, "extends", f"cyclic inheritance ({cycle}); expected a chain that ends")
    merged: dict[str, Any] = {}
    origins: Origins = {}
    for file, raw in reversed(chain):
        merged = _merge(merged, raw)
        _record_origins(raw, file, origins)
    return merged, origins


# ---------------------------------------------------------------- validation


def _error_field(err: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    """(location, message) of one pydantic error; validators name their field as "field: ..."."""
    loc = tuple(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    m = re.match(r"([a-z_]+(?:\.[a-z_]+)?): (.*)", msg)
    if err["type"] == "value_error" and m:
        named = tuple(m.group(1).split("."))
        section = _SECTIONS.get(str(loc[0])) if loc else Spec
        known = section.model_fields if section else {}
        if named[0] in known or named[0] in Spec.model_fields:
            return (loc + named if named[0] in known and loc else named), m.group(2)
    return loc, msg


def _describe(err: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    loc, msg = _error_field(err)
    field = ".".join(_name(p) if not isinstance(p, int) else str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        section = _SECTIONS.get(str(loc[0])) if len(loc) > 1 else Spec
        known = list(section.model_fields) if section else []
        hint = difflib.get_close_matches(str(loc[-1])[:40], known, n=1)
        guess = f"; did you mean {hint[0]!r}?" if hint else ""
        return loc, f"{field}: unknown field{guess} (expected one of: {', '.join(known)})"
    got = err.get("input")
    shown = "" if isinstance(got, dict) or err["type"] == "value_error" else f" (got {_excerpt(got)})"
    return loc, f"{field}: {msg}{shown}"


def _origin(loc: tuple[Any, ...], origins: Origins, default: Path | str) -> Path | str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in origins:
            return origins[loc[:n]]
    return default


_MAX_REPORTED = 4


def _validation_error(e: ValidationError, source: Path | str, origins: Origins) -> SpecError:
    parts, last = [], None
    for err in e.errors()[:_MAX_REPORTED]:
        loc, text = _describe(err)
        where = _origin(loc, origins, source)
        shown = _shown(where) if isinstance(where, Path) else where
        parts.append(text if shown == last else f"{shown}: {text}")  # the file once per run of its errors
        last = shown
    more = e.error_count() - _MAX_REPORTED
    line = "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
    return SpecError(_one_line(line))


def _check_data(spec: Spec, source: Path | str, origins: Origins, data_root: Path) -> None:
    """The data folder must hold the split `data.size` asks for: refused now, not after other runs."""
    where = _origin(("data", "size"), origins, source)
    try:
        have_train, have_valid = capacity(data_root)
    except ValueError as e:
        raise _fail(where, "data.size", f"cannot check against the data folder: {e}") from None
    n_train, n_valid = split_sizes(spec.data.size)
    if n_train > have_train or n_valid > have_valid:
        raise _fail(
            where,
            "data.size",
            f"{spec.data.size} (profile {spec.profile}) needs {n_train} train + {n_valid} valid latents but "
            f"{_shown(data_root)} holds {have_train} + {have_valid}; expected at most "
            f"{have_train + have_valid}, or encode more (`python -m runner encode`, see data/README.md)",
        )


def build_spec(
    raw: dict[str, Any],
    source: Path | str,
    profile: str = "full",
    origins: Origins | None = None,
    data_root: Path | None = DATA_DIR,
) -> Spec:
    """Validate a resolved mapping into a Spec, applying `profile`; errors name the file of each field.

    With `data_root`, the data size is also checked against what that folder holds (None skips it).
    """
    if profile not in PROFILES:
        raise _fail(source, "profile", f"unknown profile {_excerpt(profile)}; expected one of {[*PROFILES]}")
    # The file's own values are checked first, so a profile's size or epochs cannot hide a bad one.
    stages = [{**raw, "profile": "full"}]
    if PROFILES[profile]:
        stages.append({**_merge(raw, PROFILES[profile]), "profile": profile})
    try:
        spec = [Spec.model_validate(stage) for stage in stages][-1]
    except ValidationError as e:
        raise _validation_error(e, source, origins or {}) from None
    if data_root is not None:
        _check_data(spec, source, origins or {}, data_root)
    return spec


def load_spec(path: str | Path, profile: str = "full", data_root: Path | None = DATA_DIR) -> Spec:
    """Load, inherit, validate. The id is the file name's stem and must be a safe name."""
    path = Path(path)
    if path.suffix != ".yaml":
        raise _fail(path, "(file)", "expected a .yaml spec file")
    raw, origins = _resolve_extends(path)
    set_elsewhere = {"id": "the id comes from the file name", "profile": "--profile chooses the profile"}
    for key, why in set_elsewhere.items():
        if key in raw:
            raise _fail(origins[(key,)], key, f"{why}; remove the field")
    if not SAFE_ID.match(path.stem):
        raise _fail(
            path,
            "id",
            f"file name {_excerpt(path.stem)} is not a safe id; expected lowercase letters, digits, _ or -",
        )
    return build_spec({**raw, "id": path.stem}, path, profile, origins, data_root)


def load_resolved(path: str | Path) -> Spec:
    """Load a resolved spec written by `Spec.to_yaml` (the copy saved with every run)."""
    path = Path(path)
    raw = _read_yaml(path)
    try:
        return Spec.model_validate(raw)
    except ValidationError as e:
        raise _validation_error(e, path, {}) from None


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
# "InitUpg" (after InitXavierNormRelu in the one notebook that has it) extended the Xavier init to conv1.
_INIT_TOKENS = {
    "InitXavierNormRelu": "xavier_normal_relu",
    "NoInit": "default",
    "InitUpg": "xavier_normal_relu_conv1_conv2",
}
# Digit runs are bounded so that no token can make int() choke on a huge number.
_SEED_NAME = re.compile(
    r"\((\d{1,5}(?:,\d{1,5}){0,9})\)_\(([A-Za-z]{1,10})\)((?:_[A-Za-z0-9.+-]{1,20}){0,16})"
)
_SEED_HINT = (
    "expected '(32,64,64,128)_(DAAA)[_Token...]' with optional tokens "
    "InitXavierNormRelu|NoInit|InitUpg, Conv, BN, Bs<n>, Lr<x>, <n>k, <n>e"
)


def _format_lr(lr: float) -> str:
    mantissa, exponent = f"{lr:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _format_size(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _parse_size(token: str) -> int:
    return int(token[:-1]) * 1000 if token.endswith("k") else int(token)


def _seed_token(token: str, model: dict[str, Any], train: dict[str, Any], data: dict[str, Any]) -> bool:
    """Apply one name token to the sections; False when the token means nothing."""
    if token in _INIT_TOKENS:
        model["init"] = _INIT_TOKENS[token]
    elif token == "Conv":
        model["conv"] = "conv2d"
    elif token == "BN":
        model["resnet_norm"] = model["out_norm"] = "batch"
    elif re.fullmatch(r"Bs\d{1,6}", token):
        train["batch_size"] = int(token[2:])
    elif re.fullmatch(r"Lr[0-9.]{1,10}(?:e[-+]?\d{1,3})?", token):
        train["lr"] = float(token[2:])
    elif re.fullmatch(r"\d{1,8}k?", token):
        data["size"] = _parse_size(token)
    elif re.fullmatch(r"\d{1,6}e", token):
        train["epochs"] = int(token[:-1])
    else:
        return False
    return True


def seed_spec_fields(name: str) -> tuple[str, dict[str, Any]]:
    """(id, fields) of the spec an original notebook name describes: what `seed-name` saves as a file."""
    stem = name.removesuffix(".ipynb").removeprefix("image_generator_")
    m = _SEED_NAME.fullmatch(stem) if len(stem) <= 300 else None
    if not m:
        raise _fail(_excerpt(name), "name", f"not an original notebook name; {_SEED_HINT}")
    channels = [int(c) for c in m.group(1).split(",")]
    model: dict[str, Any] = {"block_out_channels": channels, "blocks": m.group(2)}
    # Notebooks with these names trained the Diffusers UNet, whose learner never scaled the gradients.
    train: dict[str, Any] = {"precision": "fp16_unscaled"}
    data: dict[str, Any] = {"scale": 0.18215}
    for token in filter(None, m.group(3).split("_")):
        try:
            known = _seed_token(token, model, train, data)
        except ValueError:
            known = False
        if not known:
            raise _fail(name, "name", f"unknown token {_excerpt(token)} in an original notebook name")
    fields = {
        "title": stem,
        "notes": f"Built from the original notebook name {stem}.",
        "data": {**{"size": SEED_DEFAULTS["size"]}, **data},
        "model": model,
        "noise": {"schedule": "ddim", "beta_end": 0.01},
        "train": {**{k: SEED_DEFAULTS[k] for k in ("batch_size", "lr", "epochs")}, **train},
    }
    return _slug(stem), fields


def seed_spec_yaml(fields: dict[str, Any]) -> str:
    """Spec fields as a YAML file that `load_spec` reads back to the same values."""
    return yaml.dump(fields, Dumper=_Dumper, sort_keys=False)


def from_seed_name(name: str, profile: str = "full", data_root: Path | None = DATA_DIR) -> Spec:
    """The spec an original notebook name describes; `spec.seed_name()` gives the name back."""
    spec_id, fields = seed_spec_fields(name)
    return build_spec({**fields, "id": spec_id}, name, profile, data_root=data_root)


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
