"""runner.originals: the bundled printed losses parsed against values read by hand, and ours beside them."""

from __future__ import annotations

import hashlib
import math

import pytest

from runner.originals import (
    ORIGINAL_RESULTS,
    EpochLoss,
    OriginalsError,
    compare_losses,
    find_original,
    load_original_results,
    parse_original_results,
)

BN_5E = "image_generator_nonorm_batchnorm_resnets"
BN_60E = "image_generator_nonorm_batchnorm_resnets_10k_60e"
XAVIER_60E = "image_generator_(32,32,64,64,128)_(DAAAA)_InitXavierNormRelu_Conv_BN_Bs16_Lr2e-4_10k_60e"


@pytest.fixture(scope="module")
def runs():
    return load_original_results()


def test_bundled_copy_is_the_shared_reference_byte_for_byte():
    # The sha256 recorded in data/reference/README.md when the file was copied.
    digest = hashlib.sha256(ORIGINAL_RESULTS.read_bytes()).hexdigest()
    assert digest == "67b3c4c803d6d9e059efc51ca1ed13070ec8254ceba68e2828d8c420f7cebc5f"


def test_values_read_by_hand(runs):
    assert len(runs) == 23  # sections counted by hand
    assert list(runs)[0] == "30_lsun_diffusion-latents"
    five = runs[BN_5E]
    assert len(five.segments) == 1 and len(five.epochs) == 5
    assert five.epochs[1] == EpochLoss(1, 0.338, 0.965)
    assert (five.epochs[0].valid, five.epochs[4].train) == (0.483, 0.326)
    sixty = runs[BN_60E].epochs
    assert len(sixty) == 37 and sixty[13] == EpochLoss(13, 0.830, 0.997)
    assert sixty[33].train == 0.996 and math.isnan(sixty[33].valid) and math.isnan(sixty[36].train)
    xavier = runs[XAVIER_60E]
    assert [len(s) for s in xavier.segments] == [40, 20, 40]
    assert xavier.segments[1][19] == EpochLoss(19, 0.210, 0.199)
    assert xavier.segments[2][0] == EpochLoss(0, 0.211, 0.221)
    no_init = runs["image_generator_nonorm_batchnorm_resnets_NoInit_60e+30e"]
    assert [len(s) for s in no_init.segments] == [60, 30] and no_init.segments[1][29].valid == 0.154
    assert runs["image_generator_norm_layernorm_layernorm_sampling"].epochs == (EpochLoss(0, 0.232, 0.114),)


def test_unknown_notebook_names_the_closest(runs):
    assert find_original(runs, BN_5E).notebook == BN_5E
    with pytest.raises(OriginalsError, match="batchnorm_resnets"):
        find_original(runs, "image_generator_nonorm_batchnorm_resnet")


@pytest.mark.parametrize(("text", "message"), [
    ("## a\n| epoch | train | valid |\n|---|---|---|\n| 0 | 0.5 | 0.4 |\n| 2 | 0.3 | 0.3 |\n",
     r"x\.md:5.*epoch 1"),
    ("## a\n| epoch | train | valid |\n|---|---|---|\n| 0 | 0.5 | oops |\n", r"x\.md:4.*'oops'"),
    ("## a\nno table here\n", r"no epochs.*\['a'\]"),
    ("| epoch | train | valid |\n", r"x\.md:1.*before any"),
    ("## a\n| epoch | train | valid |\n|---|---|---|\n| 0 | 1 | 1 |\n## a\n", "twice"),
    ("## a\n| epoch | train | valid |\n|---|---|---|\n| 0 | 1 | 1 |\ntext\n| epoch | train | valid |\n",
     "without a 'Training segment'"),
])
def test_malformed_files_are_errors_naming_the_line(text, message):
    with pytest.raises(OriginalsError, match=message):
        parse_original_results(text, "x.md")


def test_comparison_aligns_epochs_and_computes_differences():
    theirs = (EpochLoss(0, 0.533, 0.483), EpochLoss(1, 0.338, math.nan), EpochLoss(2, 0.335, 0.786))
    ours = [  # metrics.json: 1-based epochs; null where the loss was not finite
        {"epoch": 1, "train_loss": 0.5, "valid_loss": 0.4},
        {"epoch": 2, "train_loss": 0.3, "valid_loss": None},
    ]
    rows = compare_losses(ours, theirs)
    assert [r.epoch for r in rows] == [0, 1, 2]
    assert rows[0].train_diff == pytest.approx(-0.033) and rows[0].valid_diff == pytest.approx(-0.083)
    assert (rows[0].ours_valid, rows[0].theirs_valid) == (0.4, 0.483)
    assert rows[1].train_diff == pytest.approx(-0.038)
    assert rows[1].ours_valid is None and math.isnan(rows[1].theirs_valid) and rows[1].valid_diff is None
    assert rows[2].ours_train is None and rows[2].theirs_train == 0.335 and rows[2].train_diff is None
    longer = compare_losses([*ours, {"epoch": 4, "train_loss": 0.2, "valid_loss": 0.2}], theirs)
    assert len(longer) == 4 and longer[3].theirs_valid is None and longer[3].ours_valid == 0.2
    assert compare_losses([], ()) == []
