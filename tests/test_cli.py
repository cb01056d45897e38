"""`python -m runner validate|seed-name`: exit codes and output a user sees."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from runner.cli import main
from runner.spec import from_seed_name, load_spec

ROOT = Path(__file__).resolve().parent.parent


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


def test_seed_name_prints_a_spec_file_that_validates(tmp_path, capsys):
    name = "(32,32,64,64,128)_(DAAAA)_InitXavierNormRelu_Conv_BN_Bs16_Lr2e-4_10k_60e"
    assert main(["seed-name", name]) == 0
    out = capsys.readouterr().out
    file_name = re.match(r"# Save as (\S+\.yaml)", out).group(1)
    path = tmp_path / file_name
    path.write_text(out)
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    spec = load_spec(path)
    assert spec.seed_name() == name and spec == from_seed_name(name)


@pytest.mark.parametrize(
    "name",
    ["not-a-name", "(32,,64)_(DA)", "()_(D)", "(32,64)_()", "(" + "9" * 5000 + ")_(D)",
     "(32,64)_(DA)_Lr1e999"],
)
def test_malformed_seed_names_exit_2_with_one_line(name, capsys):
    assert main(["seed-name", name]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.strip().splitlines()) == 1 and len(out.err) < 400
    assert "name" in out.err or "lr" in out.err


def test_module_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "validate", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "validate" in proc.stdout


_NO_TORCH = """
import sys
from pathlib import Path
import runner.site
from runner.cli import main
root = Path(sys.argv[1])
runner.site.ROOT = root  # render into the test's folder, not the project's docs/
rc = main(sys.argv[2:])
heavy = sorted(m for m in ("torch", "diffusers") if m in sys.modules)
print("RC", rc, "HEAVY", heavy)
"""


@pytest.mark.parametrize("argv", [
    ["validate", "experiments/architecture/diffusers_baseline.yaml"],
    ["seed-name", "(32,64,64,128)_(DAAA)_Lr1e-3_10k_5e"],
    ["site", "--no-build"],
])
def test_commands_without_training_import_neither_torch_nor_diffusers(tmp_path, argv) -> None:
    results = tmp_path / "results"
    if argv[0] == "site":  # one real run folder, so pages, charts and the report are all exercised
        from test_site import _run, _spec

        _run(results, _spec("one"), "completed", 0.1, 0.2, std_peak=2.0, charts=True)
        argv = [*argv, "--results", str(results)]
    (tmp_path / "docs").mkdir()
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(tmp_path), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert "RC 0 HEAVY []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    if argv[0] == "site":
        assert (tmp_path / "docs" / "experiments" / "one" / "index.md").is_file()
