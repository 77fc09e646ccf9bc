"""The paper's numbers in ffl.paper equal reported.yaml; Figure 1's example holds with the paper's
own matrices; the figures draw the paper's numbers where it printed them and say so where not."""
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from ffl import paper, plots  # noqa: E402
from ffl.chain import layer_matrices  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path | None:
    """``../shared`` next to the repository; from a git worktree, next to its main checkout."""
    candidates = [ROOT / "shared", ROOT.parent / "shared"]
    git = ROOT / ".git"
    if git.is_file():  # a worktree: "gitdir: <main>/.git/worktrees/<name>"
        gitdir = Path(git.read_text().split("gitdir:", 1)[1].strip())
        candidates.append(gitdir.parents[2].parent / "shared")
    return next((c for c in candidates if (c / "paper" / "reported.yaml").is_file()), None)


def parse_matlab(text: str) -> np.ndarray:
    """'[a, b; c, d]'' (MATLAB rows; a trailing ' transposes) → array."""
    body, transposed = text.strip(), False
    if body.endswith("'"):
        body, transposed = body[:-1], True
    rows = [[float(v) for v in row.split(",")] for row in body.strip("[]").split(";")]
    m = np.array(rows)
    return m.T if transposed else m


# Prose in the yaml that holds no number the library must carry.
PROSE = {("figure_1", "claim"), ("tiny_imagenet", "note"), ("cifar100", "mapping_note")}


def yaml_tree() -> dict:
    where = shared_dir()
    if where is None:
        pytest.skip("../shared/paper/reported.yaml not present (the library does not need it)")
    tree = yaml.safe_load((where / "paper" / "reported.yaml").read_text())
    for key in ("W1", "W2", "W1_permuted", "W2_permuted"):
        tree["figure_1"][key] = parse_matlab(tree["figure_1"][key])
    tree["cifar100"]["text"] = [float(v) for v in re.findall(r"(\d+(?:\.\d+)?)%", tree["cifar100"]["text"])]
    for section, key in PROSE:
        del tree[section][key]
    return tree


def library_tree() -> dict:
    """ffl.paper's literals, arranged in the yaml's shape."""
    def key(measure):
        return "_".join(measure)
    return {
        "figure_1": {"h1": paper.H1, "h1_permuted": paper.H1_PERMUTED, "W1": paper.W1, "W2": paper.W2,
                     "W1_permuted": paper.W1_PERMUTED, "W2_permuted": paper.W2_PERMUTED},
        "tiny_imagenet": {key(m): {arch: paper.FIGURE_2[arch][m] for arch in paper.FIGURE_2} for m in paper.MEASURES},
        "cifar100": {"text": [paper.FIGURE_3_TEXT[m] for m in paper.MEASURES],
                     "figure_3_printed_labels": paper.FIGURE_3_PRINTED_LABELS},
        "namedata": {name: {key(m): v for m, v in paper.TABLE_1[feature].items()}
                     for name, feature in (("aligned", "chain"), ("unaligned", "layer"))},
        "factors": paper.FACTORS,
        "training": paper.TRAINING,
    }


def assert_same(ours, theirs, path=()):
    """Same keys everywhere; numbers (also in nested lists and matrices) equal; strings equal."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and set(ours) == set(theirs), f"{path}: keys {sorted(ours)} vs {sorted(theirs)}"
        for k in theirs:
            assert_same(ours[k], theirs[k], (*path, k))
    elif isinstance(theirs, str):
        assert ours == theirs, path
    elif isinstance(theirs, list) and theirs and isinstance(theirs[0], list):  # ragged rows
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, (*path, i))
    else:
        a, b = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
        assert a.shape == b.shape and np.array_equal(a, b), f"{path}: {a} vs {b}"


def count_numbers(tree) -> int:
    if isinstance(tree, dict):
        return sum(count_numbers(v) for v in tree.values())
    if isinstance(tree, list):
        return sum(count_numbers(v) for v in tree)
    if isinstance(tree, np.ndarray):
        return tree.size
    return int(isinstance(tree, (int, float)) and not isinstance(tree, bool))


def test_every_number_of_reported_yaml_is_in_the_library():
    theirs = yaml_tree()
    assert_same(library_tree(), theirs)
    # Figure 1: (6 + 9) × 2 matrices + 3 + 3; Figure 2: 24; CIFAR-100: 2 + 5; Table 1: 4; training: 13.
    assert count_numbers(theirs) == 36 + 24 + 7 + 4 + 13


def test_figure_2_has_all_24_values_as_fractions():
    frames = [paper.reported("tiny_imagenet", arch) for arch in ("mlp", "cnn")]
    both = pd.concat(frames)
    assert list(both.columns) == ["index", "feature", "protocol", "metric", "value"]
    assert len(both) == 24 and both.value.between(0, 1).all()
    assert set(both["index"]) == {1, 2, 3}
    mlp = frames[0].set_index(["protocol", "metric", "feature", "index"])["value"]
    assert mlp[("classification", "top1", "layer", 1)] == pytest.approx(0.629)
    assert mlp[("retrieval", "rank1", "chain", 3)] == pytest.approx(0.980)
    assert paper.source("tiny_imagenet", "cnn").startswith("Figure 2")


def test_cifar100_and_table_1_carry_no_index():
    cifar = paper.reported("cifar100", "mlp")
    assert cifar["index"].isna().all() and set(cifar.feature) == {"chain"}
    assert cifar.value.tolist() == pytest.approx([0.98, 0.98])
    names = paper.reported("namedata", "gru").set_index(["feature", "metric"])["value"]
    assert names[("chain", "top1")] == 1.0 and names[("layer", "rank1")] == pytest.approx(0.213)
    assert names.index.size == 4 and paper.reported("namedata", "gru")["index"].isna().all()


def test_a_setting_without_numbers_is_empty_and_the_caption_says_so():
    none = paper.reported("factors", "cnn")
    assert none.empty and list(none.columns) == ["index", "feature", "protocol", "metric", "value"]
    assert paper.source("factors", "cnn") is None
    assert "no number" in paper.caption_note("factors", "cnn") and "only ours" in paper.caption_note("cifar100", "gru")


def test_cifar100_caption_cites_figure_3_and_its_uncertain_labels():
    note = paper.caption_note("cifar100", "cnn")
    assert "Figure 3" in note and "Figure 2" not in note
    assert "99.3, 99.6, 99.2" in note and "98.0, 97.8" in note and "not drawn" in note
    assert "(dashed line)" in note
    stand_in = paper.caption_note("cifar100", "cnn", drawn=False)
    assert "dashed" not in stand_in and "none of its numbers are drawn" in stand_in


# ----------------------------------------------------------------------------- Figure 1


def test_printed_permuted_weights_are_hidden_neurons_1_and_2_swapped():
    # Independent of ffl.permute: columns of W1 (its neurons), rows of W2 (their outgoing weights).
    swap = [1, 0, 2]
    assert np.array_equal(paper.W1[:, swap], paper.W1_PERMUTED)
    assert np.array_equal(paper.W2[swap, :], paper.W2_PERMUTED)
    assert np.array_equal(paper.H1[swap], paper.H1_PERMUTED)
    assert paper.W1.shape == (2, 3) and paper.W2.shape == (3, 3)


def test_figure_1_check_with_the_papers_matrices():
    x = np.random.default_rng(0).normal(size=(20, 2))
    check = paper.figure_1_check(x)
    assert check["weights_equal"]
    w1 = layer_matrices(paper.figure_1_network())[0]
    assert w1.dtype == torch.float64 and np.array_equal(w1.numpy(), paper.W1)  # no float32 noise
    assert check["max_output_diff"] < 1e-12 and check["max_relu_output_diff"] < 1e-12
    g1 = paper.W1 @ paper.W1.T
    g2 = paper.W1 @ paper.W2 @ paper.W2.T @ paper.W1.T
    np.testing.assert_allclose(check["grams"][0], [[1.29, 0.95], [0.95, 1.34]], atol=1e-12)  # by hand
    for got, want in zip((check["grams"], check["grams_permuted"]), ((g1, g2), (g1, g2))):
        np.testing.assert_allclose(got[0], want[0], atol=1e-12)
        np.testing.assert_allclose(got[1], want[1], atol=1e-12)
    assert max(check["max_gram_diff"]) < 1e-12
    # The check has teeth: permuting only W1 (one side) changes the output and the Gram G_2.
    one_side = x @ paper.W1_PERMUTED @ paper.W2
    assert np.abs(one_side - x @ paper.W1 @ paper.W2).max() > 0.05
    assert np.abs(paper.W1_PERMUTED @ paper.W2 @ paper.W2.T @ paper.W1_PERMUTED.T - g2).max() > 0.05


def test_no_input_gives_the_printed_h1():
    x, residual = paper.figure_1_h1_least_squares()
    # By hand: the first two rows of W1ᵀx = h1 fix x; the third row then disagrees.
    x_exact = np.linalg.solve(paper.W1.T[:2], paper.H1[:2])
    third = paper.W1.T[2] @ x_exact
    assert third == pytest.approx(-0.6043, abs=1e-4) and abs(third - paper.H1[2]) > 1
    np.testing.assert_allclose(paper.W1 @ (paper.W1.T @ x - paper.H1), 0, atol=1e-12)  # normal equations
    assert residual > 0.5


def test_paper_notation_prints_two_decimals_without_float32_noise():
    assert paper.paper_notation(paper.W1) == "[0.80, 0.90; 0.10, 0.70; 0.80, 0.20]ᵀ"
    assert paper.paper_notation(paper.W2_PERMUTED, 1) == "[0.9, 0.5, 0.5; 0.1, 0.3, 0.4; 0.3, 0.4, 0.2]ᵀ"
    assert paper.W1.dtype == np.float64


# ----------------------------------------------------------------------------- figures


def ours(indices=(1, 2, 3, 4)) -> pd.DataFrame:
    return pd.DataFrame([{"index": i, "feature": f, "protocol": "classification", "metric": "top1", "value": 0.5}
                         for i in indices for f in ("layer", "chain")])


def test_bars_show_the_papers_numbers_beside_ours():
    ax = plots.protocol_bars(ours(), "top1", paper=paper.reported("tiny_imagenet", "mlp"))
    heights = sorted(round(p.get_height(), 1) for c in ax.containers for p in c if not np.isnan(p.get_height()))
    assert heights == sorted([50.0] * 8 + [99.4, 99.7, 99.1, 62.9, 2.4, 2.8])
    assert not ax.get_lines()
    plt.close(ax.figure)


def test_numbers_without_index_become_dashed_lines():
    ax = plots.protocol_bars(ours(), "top1", paper=paper.reported("cifar100", "cnn"))
    assert len(ax.containers) == 2  # only our two series are bars
    (line,) = ax.get_lines()
    assert line.get_linestyle() == "--" and line.get_ydata()[0] == pytest.approx(98.0)
    assert any("no index stated" in t.get_text() for t in ax.get_legend().get_texts())
    plt.close(ax.figure)
