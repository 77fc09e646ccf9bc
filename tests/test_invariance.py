"""§3.2's numeric check (ffl.invariance): one network's report and controls, every architecture at
once, and the cost table of the chains."""
import pytest
import torch

from ffl.invariance import (VARIANTS, broken_permutation_check, chain_costs, check_every_architecture,
                            invariance_check, randomize_batchnorm_)
from ffl.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"permutations": 2, "batch": 2, "explicit_max_dim": 243, "option_permutations": 1, "gru_lags": 1,
        "models": {"mlp": {"in_features": 3072, "hidden": [6, 5, 4]}, "cnn": {"widths": [3, 4, 5, 6]},
                   "plainnet6": {"widths": [3, 4, 5, 6, 6]}, "resnet5": {"widths": [3, 4, 5, 6]},
                   "gru": {"hidden": 4}}}


def test_invariance_report_and_controls_for_the_chapter():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = randomize_batchnorm_(build_model("resnet5", 2, activation="leaky_relu", widths=(8, 12, 16, 20)), gen).eval()
    assert not torch.equal(net.bns[0].running_var, torch.ones(8))
    x = torch.randn(4, 3, 16, 16, generator=gen)
    rows = invariance_check(net, x, permutations=2, generator=gen, explicit_max_dim=243)
    assert len(rows) == 2 * 5 and {r["chain"] for r in rows} == {1, 2, 3, 4, 5}
    assert [r["dG_explicit"] for r in rows[:5]] == [True, True, False, False, False]
    assert max(r["rel_dG"] for r in rows) < 1e-5 and max(r["max_abs_dout"] for r in rows) < 1e-5
    assert max(r["rel_dW"] for r in rows) > 0.1
    controls = broken_permutation_check(net, x, generator=gen)
    assert [c["control"] for c in controls] == ["one side only"] * 4 + ["shortcut not permuted"] * 3
    assert min(c["max_abs_dout"] for c in controls) > 1e-5 and min(c["rel_dG"] for c in controls) > 1e-3


def test_every_architecture_is_invariant_and_every_control_breaks():
    report = check_every_architecture(TINY, seed=0)
    assert list(report.table.index.get_level_values("model").unique()) == [
        "MLP-4", "MLP-4 (leaky)", "PlainNet-5", "PlainNet-5 (leaky)", "PlainNet-6", "PlainNet-6 (leaky)",
        "ResNet-5", "ResNet-5 (leaky)", "GRU-2"]
    assert len(report.rows) == TINY["permutations"] * len(report.table)
    assert report.table["max_rel_dG"].max() < 1e-5 and report.table["max_abs_dout"].max() < 1e-5
    assert report.table["max_rel_dW"].min() > 0.05
    assert report.controls["max_abs_dout"].min() > 1e-6 and report.controls["rel_dG"].min() > 1e-3
    # every network with its other chain definitions: normalization, BN unfolded (CNNs), the
    # official 3×3-only ResNet chain, no lags (GRU)
    assert len(report.options) == len(VARIANTS) + 6 + 2 + 1
    assert report.options["max_rel_dG"].max() < 1e-5
    again = check_every_architecture(TINY, seed=0)
    assert again.rows.equals(report.rows)  # one seed, one report


def test_chain_costs_agree_and_size_the_grams():
    cost, factor_seconds = chain_costs("cnn", {"widths": [2, 3, 4, 5]}, explicit_max_dim=243, seed=0)
    assert cost["dim d_l"].tolist() == [27, 243, 2187, 19683, 19683]  # the classifier continues chain 4
    assert cost["neurons n_l"].tolist() == [2, 3, 4, 5, 2]
    assert cost["explicit G_l [MiB]"].tolist() == pytest.approx([d * d * 4 / 2**20 for d in cost["dim d_l"]])
    formed = cost["explicit time [s]"].notna().tolist()
    assert formed == [True, True, False, False, False] and factor_seconds > 0
