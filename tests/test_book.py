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
