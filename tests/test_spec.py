"""Spec loading, inheritance, profiles, the original-name round trip, and every bad-input case."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from runner.spec import (
    PROFILES,
    Spec,
    SpecError,
    build_spec,
    discover,
    from_seed_name,
    load_resolved,
    load_spec,
)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path, profile: str = "full") -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path, profile)
    return str(info.value)


def test_yaml_floats_in_every_form_people_write(tmp_path):
    for text, expected in [("1e-3", 1e-3), ("1.0e-3", 1e-3), ("0.001", 1e-3), ("2E-4", 2e-4), ("1", 1.0)]:
        spec = load_spec(write(tmp_path, "lr.yaml", f"train:\n  lr: {text}\n"))
        assert spec.train.lr == pytest.approx(expected) and isinstance(spec.train.lr, float)


def test_defaults_are_the_originals_first_diffusers_run(tmp_path):
    spec = load_spec(write(tmp_path, "plain.yaml", "title: t\n"))
    assert spec.id == "plain"
    assert spec.model.block_out_channels == (32, 64, 64, 128)
    assert spec.model.blocks == "DAAA" and spec.model.init == "zero_conv2"
    assert (spec.train.batch_size, spec.train.lr, spec.train.adam_eps) == (32, 1e-3, 1e-5)
    assert (spec.data.scale, spec.data.normalize, spec.noise.schedule) == (0.2, "none", "cosine")


def test_spec_is_immutable(tmp_path):
    spec = load_spec(write(tmp_path, "a.yaml", "title: t\n"))
    with pytest.raises(ValidationError):
        spec.train.lr = 5.0  # type: ignore[misc]


def test_extends_merges_deeply_and_child_wins(tmp_path):
    write(
        tmp_path,
        "_base.yaml",
        "title: base\nmodel:\n  resnet_norm: batch\n  init: default\ntrain:\n  lr: 1e-3\n",
    )
    child = write(tmp_path, "child.yaml", "extends: _base.yaml\nmodel:\n  init: xavier_normal_relu\n")
    spec = load_spec(child)
    assert spec.title == "base"
    assert spec.model.resnet_norm == "batch" and spec.model.init == "xavier_normal_relu"
    assert spec.train.lr == 1e-3
    assert [p.name for p in discover(tmp_path)] == ["child.yaml"]


def test_extends_chain_of_three(tmp_path):
    write(tmp_path, "_a.yaml", "train:\n  batch_size: 16\n")
    write(tmp_path, "_b.yaml", "extends: _a.yaml\ntrain:\n  lr: 2e-4\n")
    spec = load_spec(write(tmp_path, "c.yaml", "extends: _b.yaml\ntrain:\n  epochs: 7\n"))
    assert (spec.train.batch_size, spec.train.lr, spec.train.epochs) == (16, 2e-4, 7)


def test_profiles_set_size_and_epochs(tmp_path):
    path = write(tmp_path, "p.yaml", "data:\n  size: 10000\ntrain:\n  epochs: 60\n")
    full = load_spec(path, "full")
    assert (full.data.size, full.train.epochs, full.profile) == (10000, 60, "full")
    for name in ("smoke", "quick"):
        spec = load_spec(path, name)
        assert spec.data.size == PROFILES[name]["data"]["size"]
        assert spec.train.epochs == PROFILES[name]["train"]["epochs"]
    quick = load_spec(path, "quick")
    steps = int(quick.data.size * 0.9) // quick.train.batch_size * quick.train.epochs
    assert steps >= 150, "the quick profile promises at least 150 optimiser steps at batch 32"


def test_content_hash_tracks_training_fields_only(tmp_path):
    a = load_spec(write(tmp_path, "a.yaml", "title: one\ntrain:\n  lr: 1e-3\n"))
    b = load_spec(write(tmp_path, "b.yaml", "title: two\nnotes: other words\ntrain:\n  lr: 1e-3\n"))
    c = load_spec(write(tmp_path, "c.yaml", "train:\n  lr: 2e-3\n"))
    assert a.content_hash() == b.content_hash() != c.content_hash()
    assert load_spec(tmp_path / "a.yaml", "quick").content_hash() != a.content_hash()


def test_resolved_copy_round_trips(tmp_path):
    spec = load_spec(
        write(tmp_path, "r.yaml", "model:\n  resnet_norm: layer\n  attention_norm: layer\n"), "smoke"
    )
    copy = tmp_path / "out" / "spec.yaml"
    copy.parent.mkdir()
    copy.write_text(spec.to_yaml())
    assert load_resolved(copy) == spec


def test_course_family_defaults(tmp_path):
    spec = load_spec(write(tmp_path, "course.yaml", "model:\n  family: course\n"))
    assert spec.model.blocks is None
    assert (spec.model.attention_start, spec.model.attention_head_dim) == (2, 8)


ORIGINAL_NAMES = [
    "(32,32,64,64,128)_(DAAAA)_InitXavierNormRelu_Conv_BN_Bs16_Lr2e-4_10k_60e",
    "(32,32,64,64,128)_(DDAAD)_InitXavierNormRelu_BN_Lr1e-5_100k_20e",
    "(32,32,64,64,128,128)_(DDAADD)_InitXavierNormRelu_Lr1e-5_100k_25e",
    "(32,64,64,128)_(DAAA)_NoInit_BN_Lr1e-4_10k_60e",
    "(32,64,64,128)_(DAAD)_Lr6e-4_2500_5e",
]


@pytest.mark.parametrize("name", ORIGINAL_NAMES)
def test_seed_name_round_trip(name):
    # data_root=None: the 100k names describe more latents than the bundled folder holds.
    spec = from_seed_name(f"image_generator_{name}.ipynb", data_root=None)
    assert spec.seed_name() == name
    assert from_seed_name(name, data_root=None) == spec


def test_seed_name_tokens_mean_what_the_originals_meant():
    spec = from_seed_name(ORIGINAL_NAMES[0])
    m, t = spec.model, spec.train
    assert m.block_out_channels == (32, 32, 64, 64, 128) and m.blocks == "DAAAA"
    assert m.init == "xavier_normal_relu" and m.conv == "conv2d"
    assert m.resnet_norm == "batch" and m.out_norm == "batch" and m.attention_norm == "group"
    assert (t.batch_size, t.lr, t.epochs, spec.data.size) == (16, 2e-4, 60, 10_000)
    assert (spec.noise.schedule, spec.noise.beta_end, spec.data.scale) == ("ddim", 0.01, 0.18215)
    assert SAFE_ID_OK(spec.id)


def SAFE_ID_OK(value: str) -> bool:  # noqa: N802 - reads as a predicate in the assertion
    from runner.spec import SAFE_ID

    return bool(SAFE_ID.match(value))


def test_seed_name_missing_tokens_take_the_originals_defaults():
    spec = from_seed_name("(32,64,64,128)_(DAAA)")
    assert (spec.train.batch_size, spec.train.lr, spec.train.epochs, spec.data.size) == (32, 1e-3, 5, 10_000)
    assert spec.model.init == "zero_conv2" and spec.model.resnet_norm == "group"


def test_seed_name_initupg_means_xavier_on_conv1_and_conv2():
    name = "(32,32,64,64,128)_(DAAAA)_InitXavierNormRelu_Conv_BN_Bs16_Lr1e-4_InitUpg"
    spec = from_seed_name(name)
    assert spec.model.init == "xavier_normal_relu_conv1_conv2" and spec.train.lr == 1e-4
    assert from_seed_name(spec.seed_name()).content_hash() == spec.content_hash()



def test_seed_name_more_latents_than_the_data_folder_holds_is_refused():
    with pytest.raises(SpecError) as info:
        from_seed_name(ORIGINAL_NAMES[1])
    msg = str(info.value)
    assert "data.size" in msg and "100000" in msg and "9000 + 1000" in msg and "\n" not in msg
    assert from_seed_name(ORIGINAL_NAMES[1], "quick").data.size == PROFILES["quick"]["data"]["size"]


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("(32,64)_(DAX)_10k", "blocks"),
        ("(32,64,64)_(DA)", "letters"),
        ("(32,64)_(DA)_Fancy", "unknown token 'Fancy'"),
        ("resnet_bn_lr", "not an original notebook name"),
        ("(32,64)_(DA)_Lr0", "greater than 0"),
    ],
)
def test_bad_seed_names(name, fragment):
    with pytest.raises(SpecError) as info:
        from_seed_name(name)
    assert fragment in str(info.value) and name in str(info.value)


# ---------------------------------------------------------------- bad input: one clear error each


def test_unknown_key_suggests_the_right_one(tmp_path):
    msg = error_of(write(tmp_path, "typo.yaml", "train:\n  learning_rat: 1e-3\n  bach_size: 3\n"))
    assert "typo.yaml" in msg and "train.bach_size" in msg and "did you mean 'batch_size'" in msg
    msg = error_of(write(tmp_path, "top.yaml", "modle:\n  blocks: DAAA\n"))
    assert "modle" in msg and "did you mean 'model'" in msg


@pytest.mark.parametrize(
    "body, field, expected",
    [
        ("train:\n  lr: fast\n", "train.lr", "valid number"),
        ("train:\n  lr: -1e-3\n", "train.lr", "greater than 0"),
        ("train:\n  lr: 0\n", "train.lr", "greater than 0"),
        ("train:\n  batch_size: 0\n", "train.batch_size", "greater than or equal to 1"),
        ("train:\n  batch_size: 3.5\n", "train.batch_size", "valid integer"),
        ("train:\n  batch_size: '32'\n", "train.batch_size", "valid integer"),
        ("train:\n  lr: true\n", "train.lr", "valid number"),
        ("model:\n  blocks: DAXA\n", "blocks", "expected only D or A"),
        ("model:\n  blocks: DAA\n", "blocks", "one letter per down block"),
        ("model:\n  resnet_norm: instance\n", "model.resnet_norm", "'group', 'batch' or 'layer'"),
        ("model:\n  block_out_channels: [32, -1]\n  blocks: DA\n", "block_out_channels", "positive"),
        ("model:\n  family: course\n  blocks: DAAA\n", "blocks", "course"),
        ("model:\n  attention_start: 1\n", "attention_start", "course family"),
        ("noise:\n  schedule: cosine\n  beta_end: 0.01\n", "beta_end", "ddim"),
        ("train:\n  precision: fp8\n", "train.precision", "'fp32', 'fp16', 'fp16_unscaled' or 'bf16'"),
        ("train:\n  last_batch: partial\n", "train.last_batch", "'keep' or 'drop'"),
        ("train:\n  epochs: 5\n  stop_after_epochs: 5\n", "stop_after_epochs", "fewer than train.epochs (5)"),
        ("train:\n  stop_after_epochs: 0\n", "train.stop_after_epochs", "greater than or equal to 1"),
        ("model:\n  batchnorm_momentum: 0.01\n", "batchnorm_momentum", "no BatchNorm layer"),
        ("model:\n  resnet_norm: batch\n  batchnorm_momentum: 0\n", "batchnorm_momentum", "(0, 1]"),
        ("model:\n  family: course\n  init: xavier_normal_relu_conv1_conv2\n", "init", "diffusers family"),
        ("- just\n- a list\n", "top level", "mapping"),
        ("id: other\n", "id", "file name"),
    ],
)
def test_bad_fields(tmp_path, body, field, expected):
    msg = error_of(write(tmp_path, "bad.yaml", body))
    assert "bad.yaml" in msg and field in msg and expected in msg


def test_cyclic_extends(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    msg = error_of(tmp_path / "a.yaml")
    assert "cyclic" in msg and "a.yaml -> b.yaml -> a.yaml" in msg


def test_missing_parent_and_bad_yaml(tmp_path):
    assert "no such spec file" in error_of(write(tmp_path, "orphan.yaml", "extends: nowhere.yaml\n"))
    assert "not valid YAML" in error_of(write(tmp_path, "broken.yaml", "train: [1, 2\n"))


@pytest.mark.parametrize("stem", ["Upper", "has space", "accent_é", "dots.in.name", "-lead"])
def test_unsafe_ids_are_rejected(tmp_path, stem):
    path = tmp_path / f"{stem}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("title: x\n")
    assert "not a safe id" in error_of(path)


def test_unknown_profile(tmp_path):
    assert "unknown profile 'huge'" in error_of(write(tmp_path, "p.yaml", "title: t\n"), "huge")


def test_build_spec_rejects_unsafe_id():
    with pytest.raises(SpecError, match="not a safe id"):
        build_spec({"id": "../../etc"}, "inline")
    assert isinstance(build_spec({"id": "ok"}, "inline"), Spec)


def test_new_training_options_default_to_what_the_originals_ran(tmp_path):
    spec = load_spec(write(tmp_path, "plain.yaml", "title: plain\n"))
    assert (spec.train.last_batch, spec.train.stop_after_epochs, spec.train.epochs_run) == ("keep", None, 5)
    assert spec.model.batchnorm_momentum == 0.1 and spec.reproduces is None
    body = "model:\n  resnet_norm: batch\n  batchnorm_momentum: cumulative\n"
    bn = load_spec(write(tmp_path, "bn.yaml", body))
    assert bn.model.batchnorm_momentum == "cumulative"


def test_short_profiles_run_their_whole_schedule(tmp_path):
    body = "train:\n  epochs: 60\n  stop_after_epochs: 15\n  precision: fp16_unscaled\n"
    path = write(tmp_path, "s.yaml", body)
    full = load_spec(path)
    assert (full.train.epochs_run, full.train.precision) == (15, "fp16_unscaled")
    for name in ("smoke", "quick"):
        short = load_spec(path, name)
        assert short.train.stop_after_epochs is None and short.train.epochs_run == short.train.epochs
        assert short.train.precision == "fp32"


def test_precision_notes_say_which_mode_ran_and_why(tmp_path):
    from runner.spec import PRECISION_NOTES, describe_precision

    assert set(PRECISION_NOTES) == {"fp32", "fp16", "fp16_unscaled", "bf16"}
    path = write(tmp_path, "p.yaml", "train:\n  precision: fp16_unscaled\n")
    full = describe_precision(load_spec(path))
    assert "no gradient scaler" in full and "Diffusers originals" in full and "profile" not in full
    quick = describe_precision(load_spec(path, "quick"))
    assert quick.startswith("fp32") and "quick profile" in quick


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TRAINING_SECTIONS = ("data.", "model.", "noise.", "train.")


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_experiment_spec_validates(profile):
    specs = [load_spec(p, profile, data_root=None) for p in discover(EXPERIMENTS)]
    assert len({s.id for s in specs}) == len(specs)
    # Every spec a suite runs also fits the bundled data; the rest need `encode` first and say so.
    for path, spec in zip(discover(EXPERIMENTS), specs, strict=True):
        if profile in spec.suites:
            load_spec(path, profile)
        elif spec.data.size > 10_000:
            with pytest.raises(SpecError, match="encode more"):
                load_spec(path, profile)


def test_each_ablation_axis_varies_one_field():
    specs = [load_spec(p, data_root=None) for p in discover(EXPERIMENTS)]
    axes: dict[str, list[Spec]] = {}
    for spec in specs:
        if spec.group == "ablations":
            axes.setdefault(spec.axis, []).append(spec)
    assert len(axes) == 4  # gradient scaling (two bases), timestep input, BatchNorm running statistics
    for axis, members in axes.items():
        flats = [{k: v for k, v in s.flat().items() if k.startswith(TRAINING_SECTIONS)} for s in members]
        changed = {k for f in flats for k in f if len({repr(g[k]) for g in flats}) > 1}
        assert len(members) >= 2 and len(changed) == 1, (axis, changed)
        assert len({repr(f[next(iter(changed))]) for f in flats}) == len(members), f"{axis}: repeated value"


# ---------------------------------------------------------------- hostile and careless input (issue 10)
#
# Each case goes through the CLI as a user would run it: exit 2, one line on stderr naming the file
# that holds the bad line and the field, nothing on stdout, and nothing quoted from foreign files.

SECRET = "SECRET_MARKER_x9"


def refusal(capsys, path: Path, profile: str = "full") -> str:
    from runner.cli import main

    assert main(["validate", "--profile", profile, str(path)]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert out.out == "" and len(lines) == 1, out.err
    assert "Traceback" not in out.err and len(lines[0]) < 500
    return lines[0]


@pytest.mark.parametrize(
    "target", ["/etc/shadow", "../../../../etc/passwd", "/dev/null", "", "   ", "../outside.yaml",
               "../../../../../../etc/outside.yaml", "sub", "/proc/self/environ"]
)
def test_extends_reaches_only_yaml_files_inside_allowed_folders(tmp_path, capsys, target):
    (tmp_path / "outside.yaml").write_text(f"title: {SECRET}\n")
    (tmp_path / "specs" / "sub").mkdir(parents=True)
    spec = write(tmp_path / "specs", "child.yaml", f"extends: '{target}'\ntitle: t\n")
    line = refusal(capsys, spec)
    assert line.startswith(f"{spec}: extends:") and SECRET not in line


def test_extends_through_a_symlink_out_of_the_folder_is_refused(tmp_path, capsys):
    (tmp_path / "outside.yaml").write_text(f"title: {SECRET}\n")
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "_base.yaml").symlink_to(tmp_path / "outside.yaml")
    line = refusal(capsys, write(tmp_path / "specs", "child.yaml", "extends: _base.yaml\n"))
    assert "extends" in line and "outside" in line and SECRET not in line


def test_extends_may_reach_the_experiments_tree(tmp_path):
    base = Path(__file__).resolve().parent.parent / "experiments" / "_diffusers.yaml"
    spec = load_spec(write(tmp_path, "mine.yaml", f"extends: {base}\ntrain: {{lr: 2e-4}}\n"))
    assert spec.model.blocks == "DAAA" and spec.train.lr == 2e-4


def test_missing_parent_names_the_file_that_refers_to_it(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "_mid.yaml", "extends: gone.yaml\ntitle: mid\n")
    line = refusal(capsys, write(tmp_path, "top.yaml", "extends: sub/_mid.yaml\n"))
    assert line.startswith(f"{tmp_path / 'sub' / '_mid.yaml'}: extends: no such spec file 'gone.yaml'")


def test_syntax_error_in_a_parent_names_the_parent_and_quotes_none_of_its_lines(tmp_path, capsys):
    write(tmp_path, "_base.yaml", f"title: ok\ntrain: [1, 2  # {SECRET}\n")
    line = refusal(capsys, write(tmp_path, "child.yaml", "extends: _base.yaml\n"))
    assert line.startswith(f"{tmp_path / '_base.yaml'}: train: line 3") and "not valid YAML" in line
    assert SECRET not in line


def test_bad_value_in_a_parent_names_the_parent(tmp_path, capsys):
    write(tmp_path, "_base.yaml", "train: {lr: .inf}\n")
    line = refusal(capsys, write(tmp_path, "child.yaml", "extends: _base.yaml\ntrain: {epochs: 2}\n"))
    assert line.startswith(f"{tmp_path / '_base.yaml'}: train.lr:") and "finite" in line


def test_directory_non_utf8_and_oversized_files(tmp_path, capsys):
    (tmp_path / "dir.yaml").mkdir()
    assert "is a directory" in refusal(capsys, tmp_path / "dir.yaml")
    (tmp_path / "latin.yaml").write_bytes(b"title: caf\xe9\n")
    assert "not UTF-8" in refusal(capsys, tmp_path / "latin.yaml")
    (tmp_path / "big.yaml").write_text("notes: " + "x" * 70_000 + "\n")
    assert "at most 65536 bytes" in refusal(capsys, tmp_path / "big.yaml")
    assert "no such spec file" in refusal(capsys, tmp_path / "absent.yaml")


def test_extends_chain_of_1100_files_is_refused_without_recursion(tmp_path, capsys):
    for i in range(1100):
        write(tmp_path, f"_c{i}.yaml", f"extends: _c{i + 1}.yaml\ntitle: level {i}\n")
    line = refusal(capsys, write(tmp_path, "deep.yaml", "extends: _c0.yaml\n"))
    assert "extends: more than 16 files" in line


def test_alias_bomb_is_refused_quickly(tmp_path, capsys):
    rows = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    rows += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    start = time.monotonic()
    line = refusal(capsys, write(tmp_path, "bomb.yaml", "\n".join(rows) + "\ntitle: *i\n"))
    assert "aliases" in line and time.monotonic() - start < 5


def test_deep_nesting_is_refused(tmp_path, capsys):
    body = "title: " + "[" * 5000 + "]" * 5000
    assert "nested deeper" in refusal(capsys, write(tmp_path, "deep.yaml", body))


@pytest.mark.parametrize(
    "body, field",
    [("train:\n  lr: 1e-3\n  lr: 2e-3\n", "train.lr"), ("title: a\ntitle: b\n", "title"),
     ("model: {init: default, init: zero_conv2}\n", "model.init")],
)
def test_duplicate_keys_are_refused(tmp_path, capsys, body, field):
    line = refusal(capsys, write(tmp_path, "dup.yaml", body))
    assert f"dup.yaml: {field}:" in line and "duplicate key" in line


@pytest.mark.parametrize(
    "body, field",
    [("train:\n  batch_size: 010\n", "train.batch_size"),
     ("model:\n  block_out_channels: [032, 064, 064, 128]\n", "model.block_out_channels"),
     ("train:\n  epochs: 1:30\n", "train.epochs"), ("train:\n  seed: 190:20:30\n", "train.seed")],
)
def test_yaml_11_integers_are_refused(tmp_path, capsys, body, field):
    line = refusal(capsys, write(tmp_path, "octal.yaml", body))
    assert f"octal.yaml: {field}" in line


def test_yaml_12_reads_text_as_text(tmp_path):
    spec = load_spec(write(tmp_path, "words.yaml", "title: yes\nnotes: 1:30\ngroup: on\naxis: '010'\n"))
    assert (spec.title, spec.notes, spec.group, spec.axis) == ("yes", "1:30", "on", "010")
    copy = tmp_path / "out" / "spec.yaml"
    copy.parent.mkdir()
    copy.write_text(spec.to_yaml())
    assert load_resolved(copy) == spec


@pytest.mark.parametrize("body", ["", "# only a comment\n", "{}\n", "---\n"])
def test_empty_specs_are_refused(tmp_path, capsys, body):
    assert "empty spec" in refusal(capsys, write(tmp_path, "empty.yaml", body))


def test_profile_written_in_a_file_is_refused(tmp_path, capsys):
    line = refusal(capsys, write(tmp_path, "p.yaml", "profile: smoke\n"))
    assert line.startswith(f"{tmp_path / 'p.yaml'}: profile:")
    write(tmp_path, "_base.yaml", "profile: quick\n")
    line = refusal(capsys, write(tmp_path, "child.yaml", "extends: _base.yaml\ntitle: t\n"))
    assert line.startswith(f"{tmp_path / '_base.yaml'}: profile:") and "--profile" in line


FLOAT_FIELDS = ["data.scale", "noise.beta_end", "train.lr", "train.adam_eps", "train.weight_decay",
                "train.divergence_factor"]


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
def test_non_finite_numbers_are_refused(tmp_path, capsys, field, value):
    section, name = field.split(".")
    ddim = "schedule: ddim, " if section == "noise" else ""  # beta_end belongs to the ddim schedule
    line = refusal(capsys, write(tmp_path, "nf.yaml", f"{section}: {{{ddim}{name}: {value}}}\n"))
    assert f"nf.yaml: {field}:" in line and "finite" in line


# Values outside the ranges the README documents, written out here rather than read from the code.
OUT_OF_RANGE = [
    ("data.size", 4), ("data.size", 10**24), ("data.scale", 0), ("data.scale", 101), ("data.scale", -1),
    ("model.layers_per_block", 0), ("model.layers_per_block", 9), ("noise.num_train_timesteps", 0),
    ("noise.num_train_timesteps", 100_001), ("train.batch_size", 0), ("train.batch_size", 100_000),
    ("train.lr", 0), ("train.lr", 10_001), ("train.adam_eps", 0), ("train.adam_eps", 2),
    ("train.weight_decay", -0.1), ("train.weight_decay", 1.5), ("train.epochs", 0), ("train.epochs", 10**24),
    ("train.epochs", 1e24), ("train.seed", -1), ("train.seed", 2**32), ("train.divergence_factor", 1),
    ("train.divergence_factor", 1e7),
]


@pytest.mark.parametrize("field, value", OUT_OF_RANGE)
def test_numbers_outside_their_documented_range_are_refused(tmp_path, capsys, field, value):
    section, name = field.split(".")
    line = refusal(capsys, write(tmp_path, "r.yaml", f"{section}:\n  {name}: {value}\n"))
    assert f"r.yaml: {field}:" in line


def test_course_and_ddim_ranges(tmp_path, capsys):
    line = refusal(capsys, write(tmp_path, "b.yaml", "noise: {schedule: ddim, beta_end: 1.0}\n"))
    assert "noise.beta_end" in line
    line = refusal(capsys, write(tmp_path, "h.yaml", "model: {family: course, attention_head_dim: 0}\n"))
    assert "model.attention_head_dim" in line
    seven = "model: {block_out_channels: [32, 32, 32, 32, 32, 32, 32]}\n"
    line = refusal(capsys, write(tmp_path, "l.yaml", seven))
    assert "model.block_out_channels" in line


@pytest.mark.parametrize("channels", [32, 48, 64, 96, 100, 128, 16])
@pytest.mark.parametrize("norm", ["group", "batch"])
def test_channels_must_suit_the_diffusers_group_norm(tmp_path, capsys, channels, norm):
    import torch

    try:  # the independent oracle: can torch build the GroupNorm(32) that diffusers builds first?
        torch.nn.GroupNorm(32, channels)
        buildable = True
    except ValueError:
        buildable = False
    body = f"model: {{block_out_channels: [{channels}, 64], blocks: DA, resnet_norm: {norm}}}\n"
    path = write(tmp_path, "ch.yaml", body)
    if buildable:
        assert load_spec(path).model.block_out_channels == (channels, 64)
    else:
        line = refusal(capsys, path)
        assert "ch.yaml: model.block_out_channels:" in line and "multiples of 32" in line


def test_course_attention_levels_need_channels_divisible_by_the_head_dim(tmp_path, capsys):
    ok = "model: {family: course, block_out_channels: [12, 20, 64, 128], attention_head_dim: 8}\n"
    assert load_spec(write(tmp_path, "ok.yaml", ok)).model.attention_start == 2
    bad = "model: {family: course, block_out_channels: [32, 64, 68, 128], attention_head_dim: 8}\n"
    assert "model.block_out_channels" in refusal(capsys, write(tmp_path, "bad.yaml", bad))


def test_batch_size_may_not_exceed_the_train_split(tmp_path, capsys):
    # smoke: 160 items, 90% of them (144) train.
    fits = write(tmp_path, "fits.yaml", "train: {batch_size: 144}\n")
    assert load_spec(fits, "smoke").train.batch_size == 144
    line = refusal(capsys, write(tmp_path, "over.yaml", "train: {batch_size: 145}\n"), "smoke")
    assert "over.yaml: train.batch_size:" in line and "144" in line


def test_data_size_may_not_exceed_the_data_folder(tmp_path, capsys):
    data = Path(__file__).resolve().parent.parent / "data" / "lsun_bedroom_10k"
    stats = json.loads((data / "stats.json").read_text())
    rows = stats["shape"][0]
    assert load_spec(write(tmp_path, "all.yaml", f"data: {{size: {rows}}}\n")).data.size == rows
    line = refusal(capsys, write(tmp_path, "more.yaml", f"data: {{size: {rows + 10}}}\n"))
    assert "more.yaml: data.size:" in line and "encode" in line


def test_huge_text_and_hostile_keys_stay_on_one_short_line(tmp_path, capsys):
    line = refusal(capsys, write(tmp_path, "t.yaml", f"title: '{SECRET * 100}'\n"))
    assert "t.yaml: title:" in line and len(line) < 300
    line = refusal(capsys, write(tmp_path, "k.yaml", '"evil\\nkey\\u2028": 1\n'))
    assert "k.yaml: " in line and "unknown field" in line


def test_readme_lists_every_documented_field_with_its_range():
    from runner.spec import field_reference

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name, description in field_reference():
        assert f"| `{name}` | {description} |" in readme, f"README lacks the row for {name}"
