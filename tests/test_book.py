"""ffl.book: one commit for every chapter of a run, read before the first chapter writes anything."""
import os

import pytest

from ffl import book


def test_run_book_records_the_commit_read_before_the_first_chapter(monkeypatch, tmp_path):
    commits = iter(["abc123", "abc123-dirty", "abc123-dirty"])  # each chapter written dirties the tree
    monkeypatch.setattr(book, "git_commit", lambda: next(commits))
    monkeypatch.delenv("FFL_COMMIT", raising=False)
    seen = []
    monkeypatch.setattr(book, "execute_chapter", lambda entry, book_dir, echo=False: seen.append(os.environ["FFL_COMMIT"]))
    monkeypatch.setattr(book, "write_run_summary", lambda book_dir, run=None: None)
    book.run_book("smoke", html=False, book_dir=tmp_path)
    assert seen == ["abc123"] * len(book.chapter_plan("smoke"))
    assert "FFL_COMMIT" not in os.environ  # the caller's environment is left as it was


def test_provenance_takes_the_commit_from_the_environment(monkeypatch):
    from ffl.provenance import git_commit, run_info

    monkeypatch.setenv("FFL_COMMIT", "feedbeef")
    assert git_commit() == "feedbeef" and run_info()["commit"] == "feedbeef"


def test_progress_bars_keep_their_last_redraw_and_other_output_its_order():
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    def stream(name, text):
        return new_output("stream", name=name, text=text)

    bar = [stream("stderr", f"\rzoo:  {p:3d}%|") for p in (0, 50, 100)]
    cell = new_code_cell("train()", outputs=[
        stream("stdout", "loading\n"), *bar, stream("stderr", "\n"),
        stream("stdout", "trained\n"),
        stream("stderr", "\rprotocols: 1/2"), stream("stderr", "\rprotocols: 2/2\n"),
        new_output("display_data", data={"text/plain": "table"}),
        stream("stderr", "a warning\n"),
    ])
    nb = new_notebook(cells=[cell])
    book.collapse_progress(nb)
    outs = nb.cells[0].outputs
    assert [(o.output_type, o.get("name"), o.get("text")) for o in outs] == [
        ("stream", "stdout", "loading\n"),
        ("stream", "stderr", "zoo:  100%|\n"),
        ("stream", "stdout", "trained\n"),
        ("stream", "stderr", "protocols: 2/2\n"),
        ("display_data", None, None),
        ("stream", "stderr", "a warning\n"),
    ]
    nbformat.validate(nb)


def test_a_run_on_another_dataset_names_it_in_every_title():
    """`python -m ffl.book run --dataset cifar10`: the chapters that take a dataset run on it and
    their titles say so; the others are unchanged; an unknown name is refused with the choices."""
    plan = {e["output"]: e for e in book.chapter_plan("paper", dataset="cifar10")}
    assert plan["cifar100_mlp"]["parameters"]["dataset"] == "cifar10"
    assert plan["cifar100_mlp"]["title"].startswith("CIFAR-10 (in place of CIFAR-100) with MLP-4")
    assert plan["factors"]["parameters"]["dataset"] == "cifar10"
    assert "dataset" not in plan["namedata"]["parameters"]
    assert book.chapter_plan("paper")[2]["parameters"]["dataset"] == "cifar100"
    with pytest.raises(ValueError, match="unknown dataset 'cifar1000'; choose one of"):
        book.chapter_plan("paper", dataset="cifar1000")


def test_book_zoos_are_the_specs_the_chapters_train_and_a_shared_zoo_counts_once(tmp_path):
    """`python -m ffl.book zoos` (ffl.costs): every chapter's zoo spec, as the chapter builds it; the laptop
    factors' Baseline is the CNN-gap study's widths-16–128 zoo (one cache), so its recorded training
    time counts once; a zoo not in the cache has no time."""
    import json

    from ffl import costs as book_costs
    from ffl.experiment import factor_settings
    from ffl.profile_settings import load, spec_from_profile
    from ffl.zoo import cached_zoo_root

    zoos = book_costs.book_zoos("laptop")
    by = {(z["chapter"], z["zoo"]): z["spec"] for z in zoos}
    assert by[("tiny_imagenet_cnn", "cnn")] == spec_from_profile("laptop", "tiny_imagenet", arch="cnn",
                                                                  dataset="tiny_imagenet")
    assert by[("cifar100_cnn", "cnn")].dataset == "cifar10"
    assert {name for chapter, name in by if chapter == "factors"} == set(factor_settings(load("laptop").section("factors")))
    assert by[("factors", "Baseline")].identity() == by[("cnn_gap", "widths 16–128")].identity()
    assert not any(chapter in ("beyond", "preliminaries") for chapter, _ in by)

    root = cached_zoo_root(by[("factors", "Baseline")], tmp_path)
    root.mkdir(parents=True)
    (root / "provenance.json").write_text(json.dumps({"seconds": 600.5, "batch_networks": 32}))
    costs = book_costs.zoo_costs("laptop", tmp_path).set_index(["chapter", "zoo"])
    assert costs.loc[("factors", "Baseline"), "seconds"] == 600.5 and costs.loc[("factors", "Baseline"), "chunk"] == 32
    assert costs.loc[("cnn_gap", "widths 16–128"), "shared"] == "factors: Baseline"
    assert costs.loc[("factors", "Baseline"), "shared"] == ""
    counted = costs[costs.shared == ""]
    assert counted.seconds.sum() == 600.5 and counted.seconds.isna().sum() == len(counted) - 1
    assert costs.loc[("factors", "Depth"), "networks"] == 20 * 10
