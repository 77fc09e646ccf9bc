"""What a chapter prints about its run (ffl.report): sizes counted independently, the paper's
numbers placed beside ours, stage times with the zoo's recorded training time."""
import os
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from ffl import report
from ffl.experiment import Experiment
from ffl.features import FeatureConfig
from ffl.protocols import ProtocolSplit
from ffl.zoo import ZooSpec, train_zoo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    spec = ZooSpec.from_dict(dict(arch="mlp", dataset="synthetic", tasks=[0, 1, 2, 3, 4], runs=5,
                                  model_kwargs={"hidden": [8, 8]}, epochs=1, lr=0.05, batch_size=64,
                                  data_kwargs={"n_train": 64, "n_test": 32}))
    zoo = train_zoo(spec, tmp_path_factory.mktemp("zoo"), progress=False)
    return Experiment(zoo=zoo, results=pd.DataFrame(), split=ProtocolSplit(),
                      features=FeatureConfig(), seconds={"zoo": "cached", "features and protocols": 1.5})


def test_run_table_counts_the_protocol_sizes(tiny_experiment):
    table = report.run_table(tiny_experiment)
    # 5 tasks × 5 runs: 3 of 5 runs per task learn Θ; 3 of 5 tasks are seen; 1 of 5 runs a query
    assert "5 tasks × 5 runs = 25 networks" in table
    assert "Θ learned on 15 networks, 10 classified into 5 tasks" in table
    assert "Θ learned on the 15 networks of 3 tasks; 2 unseen tasks give 2 queries against a gallery of 8" in table
    assert "1 epoch, lr/10 after none" in table and "no weight decay" in table


def test_stage_table_names_the_recorded_training(tiny_experiment):
    table = report.stage_table(tiny_experiment)
    assert "| zoo | cached (trained in " in table and " s on " in table
    assert "| features and protocols | 1.5 s |" in table


def test_paper_beside_ours_places_an_unindexed_table():
    ours = pd.DataFrame([{"index": i, "feature": f, "protocol": p, "metric": m, "value": v}
                         for i in (1, 2) for f, v in (("chain", 0.9), ("layer", 0.3))
                         for p, m in (("classification", "top1"), ("retrieval", "rank1"))])
    paper = pd.DataFrame([{"index": pd.NA, "feature": "chain", "protocol": "classification", "metric": "top1",
                           "value": 1.0}]).astype({"index": "Int64"})
    table = report.paper_beside_ours(ours, paper)
    assert table.loc["aligned (chain 1)", ("classification top-1 (%)", "paper")] == 100.0
    assert table.loc["aligned (chain 1)", ("classification top-1 (%)", "ours")] == 90.0
    assert table.loc["unaligned (layer 1)", ("retrieval rank-1 (%)", "ours")] == 30.0
    assert pd.isna(table.loc["unaligned (layer 1)", ("retrieval rank-1 (%)", "paper")])


def test_paper_beside_ours_rounds_as_the_chapters_tables_do():
    # 783 of 2,000 = 39.15 %: Python's round() gives 39.1, pandas' 39.2; one number, one reading
    ours = pd.DataFrame([{"index": 1, "feature": f, "protocol": "classification", "metric": "top1", "value": 783 / 2000}
                         for f in ("chain", "layer")])
    table = report.paper_beside_ours(ours, ours.iloc[:0])
    chapter_table = (100 * ours["value"]).round(1)
    assert table.loc["unaligned (layer 1)", ("classification top-1 (%)", "ours")] == chapter_table[1] == 39.2


@pytest.mark.parametrize("profile", ["smoke", "laptop", "paper"])
def test_every_namedata_zoo_draws_names_as_the_official_trainer(profile):
    from ffl.zoo import spec_from_profile

    spec = spec_from_profile(profile, "namedata", arch="gru", dataset="namedata")
    assert spec.sampling == "balanced" and spec.batch_size == 1 and spec.momentum == 0


def test_data_note_names_the_data_read_from_the_data_itself(tmp_path):
    """The run table's data row: counts per class read from the first task, the file read, and for
    data other than the chapter's own that the paper's numbers are not drawn."""
    from tests.test_data import write_fake_cifar10_npz, write_fake_tiny_npz

    from ffl.data import CIFAR10_NPZ, TINY_IMAGENET_NPZ

    write_fake_cifar10_npz(tmp_path / CIFAR10_NPZ, n_train=3, n_test=2)
    spec = ZooSpec.from_dict(dict(arch="mlp", dataset="cifar10", tasks=[1], runs=1, epochs=1,
                                  data_kwargs={"max_train_per_class": 2}))
    note = report.data_note(spec, data_root=str(tmp_path), stands_for="cifar100")
    assert note.startswith("CIFAR-10 (in place of CIFAR-100): real CIFAR-10 images, not CIFAR-100, so the paper's")
    assert "2 training and 2 test images per class, read from `cifar10_yoongikim_jpeg.npz` (JPEG re-encodings" in note
    (tmp_path / TINY_IMAGENET_NPZ).parent.mkdir(parents=True)
    write_fake_tiny_npz(tmp_path / TINY_IMAGENET_NPZ, n_classes=4, n_train=3, n_val=2)
    tiny = ZooSpec.from_dict(dict(arch="mlp", dataset="tiny_imagenet", tasks=[0], runs=1, epochs=1))
    assert report.data_note(tiny, data_root=str(tmp_path), stands_for="tiny_imagenet") == (
        "tiny ImageNet, 3 training images per class (2 validation images per class as the test set), "
        "read from `tiny_imagenet_200_jpeg.npz`")
    synthetic = ZooSpec.from_dict(dict(arch="mlp", dataset="synthetic", tasks=[0], runs=1, epochs=1,
                                       data_kwargs={"n_train": 10, "n_test": 4}))
    assert report.data_note(synthetic, stands_for="cifar100") == (
        "the synthetic stand-in (2 classes per task, 5 training images per class), not CIFAR-100: the "
        "paper's numbers are not drawn beside it")


@pytest.mark.skipif(not (Path(os.environ.get("FFL_DATA_ROOT", ROOT.parent / "shared" / "data")) / "names").is_dir(),
                    reason="no NameData under $FFL_DATA_ROOT or ../shared/data")
@pytest.mark.parametrize("top1, rank1, expect", [
    (1.0, 0.95, "The chains reach the paper's numbers, none more than 2 points below (top-1 at index 1: 100.0 % "
                "against 100.0 %; rank-1 at index 1: 95.0 % against 95.7 %)."),
    (0.9, 0.5, "The chains fall short of the paper by up to 45.7 points (top-1 at index 1: 90.0 % against 100.0 %; "
               "rank-1 at index 1: 50.0 % against 95.7 %). WHY")])
def test_scale_note_states_the_namedata_scale_in_names_and_the_gap_to_table_1(top1, rank1, expect):
    """NameData's page: its zoo against the paper's (§4.3: 9 tasks × 100 runs, 128 hidden units,
    10,000 steps on the same names), and its index-1 chain against Table 1 (100 % / 95.7 %)."""
    from ffl.profile_settings import spec_from_profile

    data_root = os.environ.get("FFL_DATA_ROOT", str(ROOT.parent / "shared" / "data"))
    spec = spec_from_profile("laptop", "namedata", arch="gru", dataset="namedata", data_root=data_root)
    zoo = SimpleNamespace(spec=spec, tasks=torch.arange(9).repeat_interleave(spec.runs))
    results = pd.DataFrame([{"index": 1, "feature": "chain", "protocol": p, "metric": m, "value": v}
                            for p, m, v in (("classification", "top1", top1), ("retrieval", "rank1", rank1))])
    note = report.scale_note(Experiment(zoo=zoo, results=results), "namedata", data_root=data_root,
                             shown=(1,), why="WHY")
    assert note.startswith(f"**Scale.** This page: 9 tasks × {spec.runs} runs of gru (hidden 32), "
                           f"{spec.steps:,} SGD steps per network on ")
    assert "training names per task. The paper: 9 tasks × 100 runs of GRU-2 with 128 hidden units, about 10,000 " \
           "steps per network on the same names." in note
    assert note.endswith(expect)


def test_zoo_numbers_are_the_run_tables_sizes(tiny_experiment):
    """The counts a chapter's prose glues are the ones its run table states (one split, counted once)."""
    numbers = report.zoo_numbers(tiny_experiment, stands_for="cifar100")
    assert {k: numbers[k] for k in ("n_networks", "n_tasks", "n_runs", "n_cls_test", "n_queries", "n_gallery")} == (
        {"n_networks": 25, "n_tasks": 5, "n_runs": 5, "n_cls_test": 10, "n_queries": 2, "n_gallery": 8})
    assert isinstance(numbers["data_note"], report.Md) and "not CIFAR-100" in numbers["data_note"]
    assert 0 <= numbers["test_acc"] <= 100
    assert f"| data | {numbers['data_note']} |" in report.run_table(tiny_experiment, data=numbers["data_note"])


def _results(values: dict[tuple[str, int], float]) -> pd.DataFrame:
    return pd.DataFrame([{"index": i, "feature": f, "protocol": p, "metric": m, "dim": 10 * i, "value": v}
                         for (f, i), v in values.items()
                         for p, m in (("classification", "top1"), ("retrieval", "rank1"))])


def test_index_numbers_name_each_index_and_the_best_over_the_indices_asked():
    results = _results({("chain", 1): 0.5, ("chain", 2): 0.8, ("chain", 3): 0.8, ("chain", 4): 0.9,
                        ("layer", 1): 0.4, ("layer", 2): 0.2, ("layer", 3): 0.1, ("layer", 4): 0.3})
    paper = report.index_numbers(results, best_over=report.PAPER_INDICES)
    assert paper["chain_top1_2"] == 80.0 and paper["layer_rank1_3"] == pytest.approx(10.0)
    assert "chain_top1_4" not in paper
    assert (paper["best_chain_rank1"], paper["best_chain_rank1_index"]) == (80.0, 2)  # the first of ties
    assert (paper["best_layer_top1"], paper["best_layer_top1_index"]) == (40.0, 1)
    every = report.index_numbers(results)
    assert (every["best_chain_top1"], every["best_chain_top1_index"]) == (90.0, 4)


def test_index_table_and_its_split_at_the_papers_indices():
    results = _results({(f, i): 0.5 for f in ("chain", "layer") for i in (1, 2, 3, 4)})
    results = pd.concat([results, results.assign(metric="rank5"), results.assign(metric="mAP")])
    table = report.index_table(results)
    assert list(table.columns) == ["top1", "rank1", "rank5", "mAP"] and (table == 50.0).all().all()
    at, others = report.split_at(table)
    assert set(at.index.get_level_values("index")) == {1, 2, 3}
    assert set(others.index.get_level_values("index")) == {4}


def test_the_papers_numbers_are_drawn_only_on_its_own_data():
    paper, note = report.paper_drawn("tiny_imagenet", "mlp", "tiny_imagenet")
    assert len(paper) and "drawn beside ours" in note
    stand_in, note = report.paper_drawn("tiny_imagenet", "mlp", "synthetic")
    assert stand_in is None and "none of its numbers are drawn" in note
    assert report.paper_indices("tiny_imagenet", "cnn") == (1, 2, 3)
    assert report.paper_indices("cifar100", "mlp") == report.PAPER_INDICES  # its text names no index
    results = _results({(f, i): 0.5 for f in ("chain", "layer") for i in (1, 2, 3)})
    beside = report.paper_beside_ours_by_index(results, paper, (1, 2, 3))
    assert {source for _, source in beside.columns} == {"paper", "ours"} and len(beside) == 6
    ours = report.paper_beside_ours_by_index(results, stand_in, (1, 2, 3))
    assert {source for _, source in ours.columns} == {"ours"} and (ours == 50.0).all().all()


def test_data_label_is_the_presentations_and_the_books():
    from ffl import book

    assert report.data_label("cifar10", "cifar100") == "CIFAR-10 (in place of CIFAR-100)"
    assert report.data_label("synthetic", "tiny_imagenet") == "Synthetic stand-in for Tiny ImageNet"
    assert book.data_label is report.data_label


def test_against_paper_says_fewer_more_or_as_many_as_each_is():
    """The scale note's comparison is read off the two specs, not typed: a zoo with more steps than
    the paper's says more."""
    from ffl.report import against_paper
    from ffl.zoo import ZooSpec

    ours = ZooSpec(arch="cnn", dataset="cifar10", tasks=list(range(20)), runs=20, model_kwargs={"widths": [16, 32, 64, 128]})
    paper = ZooSpec(arch="cnn", dataset="cifar100", tasks=list(range(50)), runs=100)
    text = against_paper(ours, paper, steps=(630, 400), images=(1000, 1000))
    assert text == ("This page's zoo against the paper's: narrower networks (16–32–64–128 against 32–64–128–256), "
                    "more SGD steps per network (630 against 400), as many training images per task (1,000) and "
                    "fewer runs per task (20 against 100).")
