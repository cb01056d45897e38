"""`python -m runner validate|seed-name`: exit codes and output a user sees."""

from __future__ import annotations

import subprocess
import sys

import yaml

from runner.cli import main
from runner.spec import Spec


def test_validate_prints_one_line_per_valid_file_and_exits_0(tmp_path, capsys):
    a = tmp_path / "a.yaml"
    a.write_text("train: {lr: 2e-4}\n")
    b = tmp_path / "b.yaml"
    b.write_text("model: {resnet_norm: batch}\n")
    assert main(["validate", str(a), str(b)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{a}: ok") and "lr=0.0002" in lines[0]


def test_validate_reports_every_bad_file_and_exits_2(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("title: good\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {batch_sise: 8}\n")
    assert main(["validate", str(good), str(bad)]) == 2
    out = capsys.readouterr()
    assert "good.yaml: ok" in out.out
    assert "bad.yaml" in out.err and "did you mean 'batch_size'" in out.err


def test_seed_name_prints_a_resolved_spec(capsys):
    name = "(32,32,64,64,128)_(DAAAA)_InitXavierNormRelu_Conv_BN_Bs16_Lr2e-4_10k_60e"
    assert main(["seed-name", name]) == 0
    spec = Spec.model_validate(yaml.safe_load(capsys.readouterr().out))
    assert spec.seed_name() == name
    assert main(["seed-name", "not-a-name"]) == 2


def test_module_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "validate", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "validate" in proc.stdout
