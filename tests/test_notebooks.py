"""Notebooks: pairs in sync, every chapter runs at the smoke profile, and the book builds."""
import os
import re
import shutil
from pathlib import Path

import jupytext
import nbformat
import papermill
import pytest
import torch

from ffl import book

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "notebooks").glob("*.py"))


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_pair_in_sync_and_ipynb_without_outputs(source):
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{ipynb.name} missing: run `jupytext --sync {source.relative_to(ROOT)}`"
    text_nb, paired_nb = jupytext.read(source), nbformat.read(ipynb, as_version=4)
    cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]  # noqa: E731
    assert cells(text_nb) == cells(paired_nb), f"{source.name} and {ipynb.name} drifted: run jupytext --sync"
    assert all(not c.get("outputs") for c in paired_nb.cells if c.cell_type == "code"), f"{ipynb.name} has outputs"
    assert paired_nb.metadata.get("kernelspec", {}).get("name") == "python3", "papermill needs a kernelspec"
    tagged = [c for c in paired_nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert "profile" in tagged[0].source


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_a_chapter_imports_the_library_not_the_book_runner(source):
    """Chapters call science and presentation modules; ffl.book (and papermill with it) runs them."""
    assert not re.search(r"\bffl\.book\b|^\s*from ffl import .*\bbook\b", source.read_text(), flags=re.M)


def test_every_notebook_is_a_smoke_chapter():
    run = {entry["notebook"] for entry in book.chapter_plan("smoke")}
    assert run == {s.stem for s in SOURCES}


@pytest.mark.slow
def test_unknown_arch_stops_at_once(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match="unknown arch 'resnet50'"):
        papermill.execute_notebook(str(ROOT / "notebooks" / "cifar100.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"arch": "resnet50"}, kernel_name="python3", progress_bar=False)
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    executed = [c for c in out.cells if c.cell_type == "code" and c.get("execution_count")]
    assert len(executed) <= 3, "the error must come before the zoo is trained"


@pytest.mark.slow
def test_cifar100_without_data_stops_in_the_first_cell(tmp_path):
    """The design card's command, offline and without CIFAR-100: the first cell names the files and
    the two ways on, before any training."""
    with pytest.raises(papermill.PapermillExecutionError) as e:
        papermill.execute_notebook(str(ROOT / "notebooks" / "cifar100.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"arch": "cnn", "data_root": str(tmp_path), "download": False},
                                   kernel_name="python3", progress_bar=False)
    assert "cifar-100-python" in str(e.value) and "-p dataset synthetic" in str(e.value)
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    executed = [c for c in out.cells if c.cell_type == "code" and c.get("execution_count")]
    assert len(executed) <= 3, "the error must come before the zoo is trained"


def _book_skeleton(tmp_path: Path) -> Path:
    return book.book_skeleton(tmp_path / "book")


def test_smoke_book_never_writes_the_committed_book():
    """`python -m ffl.book run --profile smoke` (and `make test`) writes under _build/, not book/."""
    assert book.default_book_dir("smoke") == ROOT / "_build" / "smoke" / "book"
    assert book.default_book_dir("laptop") == book.BOOK_DIR == ROOT / "book"


def test_book_skeleton_outside_book(tmp_path):
    out = book.book_skeleton(tmp_path / "b" / "book")
    assert (tmp_path / "b" / "_config.yml").is_file() and (out / "intro.md").is_file()
    assert (out / "_toc.yml").resolve() == (tmp_path / "b" / "_toc.yml").resolve()
    assert book.book_skeleton(out) == out  # again: no error
    assert book.book_skeleton(book.BOOK_DIR) == book.BOOK_DIR  # the committed book is left alone


def _names_fixture(root: Path) -> Path:
    """NameData in its real on-disk layout (names/<Language>.txt), 40 made-up names per language
    with a letter pattern of their own, for a machine without the real files."""
    from ffl.data import NAMEDATA_LANGUAGES

    gen = torch.Generator().manual_seed(0)
    for i, lang in enumerate(NAMEDATA_LANGUAGES):
        stems = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (3,), generator=gen)) for _ in range(40)]
        names = [f"{chr(65 + i)}{stem}{'aeiou'[i % 5] * (1 + i % 3)}" for stem in stems]
        (root / "names").mkdir(parents=True, exist_ok=True)
        (root / "names" / f"{lang}.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    return root


@pytest.mark.slow
def test_smoke_book_runs_every_chapter_and_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("FFL_CACHE", str(tmp_path / "cache"))
    if "FFL_DATA_ROOT" not in os.environ:  # `make test` exports ../shared/data when it is there
        shared = ROOT.parent / "shared" / "data"
        monkeypatch.setenv("FFL_DATA_ROOT", str(shared if (shared / "names").is_dir() else _names_fixture(tmp_path / "data")))
    book_dir = _book_skeleton(tmp_path)
    for entry in book.chapter_plan("smoke"):
        out = book.execute_chapter(entry, book_dir)
        meta = nbformat.read(out, as_version=4).metadata["ffl"]
        assert meta["profile"] == "smoke" and meta["commit"] and meta["hardware"]
    summary = book.write_run_summary(book_dir).read_text()
    assert summary.count("| smoke |") == len(book.chapter_plan("smoke"))
    html = book.build_html(book_dir)
    pages = {p.stem for p in (html / "chapters").glob("*.html")}
    assert pages == {e["output"] for e in book.chapter_plan("smoke")}
    assert "smoke" in (html / "intro.html").read_text()


@pytest.mark.slow
def test_committed_chapters_render_without_running(tmp_path):
    """`jupyter-book build book/` on a fresh clone: renders the committed, executed chapters: the laptop book's."""
    book_dir = _book_skeleton(tmp_path)
    shutil.copytree(ROOT / "book" / "chapters", book_dir / "chapters", dirs_exist_ok=True)
    shutil.copy(ROOT / "book" / "run_summary.md", book_dir / "run_summary.md")
    for nb_path in (book_dir / "chapters").glob("*.ipynb"):
        nb = nbformat.read(nb_path, as_version=4)
        assert "ffl" in nb.metadata, f"{nb_path.name} was not produced by python -m ffl.book"
        assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{nb_path.name} not executed"
    html = book.build_html(book_dir)
    assert {p.stem for p in (html / "chapters").glob("*.html")} == {e["output"] for e in book.chapter_plan("laptop")}


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "cifar10_substitute").is_dir(), reason="no shared real data")
def test_cifar100_notebook_runs_on_cifar10_in_its_place(tmp_path, monkeypatch):
    """`-p dataset cifar10`: the CIFAR-100 notebook end to end on the real CIFAR-10 copy, its tables
    naming the data and drawing none of the paper's CIFAR-100 numbers."""
    monkeypatch.setenv("FFL_CACHE", str(tmp_path / "cache"))
    papermill.execute_notebook(str(ROOT / "notebooks" / "cifar100.ipynb"), str(tmp_path / "out.ipynb"),
                               parameters={"arch": "mlp", "dataset": "cifar10", "profile": "smoke",
                                           "data_root": str(ROOT.parent / "shared" / "data"), "download": False},
                               kernel_name="python3", progress_bar=False)
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    shown = "\n".join("".join(o.get("data", {}).get("text/markdown", "")) + "".join(o.get("text", ""))
                      for c in out.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "on cifar10: 10 tasks × 10 runs = 100 networks" in shown
    assert ("| data | CIFAR-10 (in place of CIFAR-100): real CIFAR-10 images, not CIFAR-100, so the paper's numbers "
            "are not drawn beside it; two-class tasks from the 45 class pairs, 128 training and 64 test images per "
            "class, read from `cifar10_yoongikim_jpeg.npz`") in shown


def test_chapter_titles_are_distinct():
    plan = book.chapter_plan("smoke")
    titles = [e["title"] for e in plan if e["notebook"] == "cifar100"]
    assert len(titles) == len(set(titles)) >= 2
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Old\n\nprose")])
    book._set_title(nb, "New")
    assert nb.cells[0].source == "# New\n\nprose"


def test_chapter_metadata_records_a_device_parameter(tmp_path, monkeypatch):
    """A chapter whose parameters name the device (the paper profile's GPU chapters) is recorded
    with it; a device given twice once broke the metadata after the whole run."""
    def fake_execute(src, dst, parameters, **kw):
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# T")]), dst)

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    entry = {"notebook": "namedata", "output": "namedata", "parameters": {"profile": "paper", "device": "cpu"}}
    out = book.execute_chapter(entry, tmp_path)
    meta = nbformat.read(out, as_version=4).metadata["ffl"]
    assert meta["device"] == "cpu" and meta["profile"] == "paper" and meta["notebook"] == "namedata"


def test_laptop_profile_runs_every_chapter_with_several_unseen_tasks():
    """The committed book's profile: every notebook, zoos of at least 10 tasks (NameData: its 9)
    × 20 runs (factors: 10 × 10 per setting), so every retrieval split keeps several unseen tasks."""
    from ffl.data import num_tasks
    from ffl.profiles import load_profile

    plan = book.chapter_plan("laptop")
    assert {e["notebook"] for e in plan} == {s.stem for s in SOURCES}
    assert {e["output"] for e in plan} == {e["output"] for e in book.chapter_plan("smoke")}
    settings = load_profile("laptop")
    for entry in plan:
        section = {"cifar100": "cifar100", "tiny_imagenet": "tiny_imagenet", "namedata": "namedata",
                   "factors": "factors"}.get(entry["notebook"])
        if section is None:
            continue
        zoo = settings[section]["zoo"]
        dataset = entry["parameters"].get("dataset", "namedata")
        least_runs = 10 if section == "factors" else 20
        assert zoo["runs"] >= least_runs and zoo["tasks"] >= min(10, num_tasks(dataset)), section
        unseen = zoo["tasks"] - round(settings[section]["split"]["train_task_fraction"] * zoo["tasks"])
        assert unseen >= 4, section


@pytest.mark.slow
@pytest.mark.skipif(not (Path(os.environ.get("FFL_DATA_ROOT", ROOT.parent / "shared" / "data")) / "names").is_dir(),
                    reason="no NameData under $FFL_DATA_ROOT or ../shared/data")
def test_beyond_chapter_runs_at_smoke_and_says_where_ffl_loses(tmp_path, monkeypatch):
    """The comparison with weight matching and CKA end to end at the smoke profile: every zoo's row,
    weight matching marked n/a for GRU-2, the losses and costs glued, not typed."""
    monkeypatch.setenv("FFL_CACHE", str(tmp_path / "cache"))
    papermill.execute_notebook(str(ROOT / "notebooks" / "beyond.ipynb"), str(tmp_path / "out.ipynb"),
                               parameters={"profile": "smoke", "data_root": os.environ.get("FFL_DATA_ROOT",
                                                                                      str(ROOT.parent / "shared" / "data"))},
                               kernel_name="python3", progress_bar=False)
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    shown = "\n".join("".join(o.get("data", {}).get("text/plain", "")) for c in out.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "GRU-2, namedata" in shown and "not applicable" in shown and "n/a" in shown
    glued = {o["metadata"]["scrapbook"]["name"] for c in out.cells for o in c.get("outputs", [])
             if o.get("metadata", {}).get("scrapbook")}
    assert {"methods_figure", "losses", "n_lost", "cost_chain", "cost_weight_matching", "cost_cka"} <= glued
