"""Build the book: run every chapter notebook through papermill with a named profile, record what
produced it, then compile the HTML with Jupyter Book 1 (notebook execution off, warnings fatal).

    python -m ffl.book run --profile smoke            # run all chapters, then build the HTML
    python -m ffl.book run --profile smoke --no-html  # only run the chapters
    python -m ffl.book html                           # only compile the committed chapters
    python -m ffl.book zoos --profile laptop          # the zoos it trains, and their recorded time

Without a subcommand the options go to ``run`` (``python -m ffl.book --profile smoke``,
``python -m ffl.book --html-only``).

The chapters a profile runs, and their papermill parameters, are listed in its ``chapters``
section, so nothing is typed by hand. Each chapter is executed into a temporary file and moved
into ``<book>/chapters/`` only when it succeeded: a failed run leaves the previous chapter intact.

Where the book goes: a profile's ``book_dir`` (relative to the repository), else ``book/``, the
committed book (the ``laptop`` profile's run). The ``smoke`` profile, for CI and quick checks,
writes to ``_build/smoke/book`` (HTML in ``_build/smoke/_build/html``) and never touches
``book/``; ``--book-dir`` overrides both.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
import papermill

from ffl import fidelity
from ffl.checks import as_folder
from ffl.cli import Command, run_command_line
from ffl.files import atomic_path, clean_stale_temp, write_bytes_atomic
from ffl.profiles import chapter_entries, load_profile
from ffl.provenance import REPO_ROOT, git_commit, run_info
from ffl.report import data_label

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
BOOK_DIR = REPO_ROOT / "book"


def default_book_dir(profile: str) -> Path:
    """The profile's ``book_dir`` (relative to the repository root), else ``book/``."""
    folder = load_profile(profile).get("book_dir")
    return REPO_ROOT / folder if folder else BOOK_DIR


def book_skeleton(book_dir: Path) -> Path:
    """Make ``book_dir`` a buildable book outside ``book/``: ``_config.yml`` and ``_toc.yml`` beside
    it (where ``jupyter-book build`` looks), ``intro.md``, the committed GPU part ``paper_scale/``
    (which no CPU profile reruns) and a ``_toc.yml`` link in it."""
    book_dir = Path(book_dir)
    if book_dir.resolve() == BOOK_DIR.resolve():
        return book_dir
    (book_dir / "chapters").mkdir(parents=True, exist_ok=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(REPO_ROOT / name, book_dir.parent / name)
    shutil.copy(BOOK_DIR / "intro.md", book_dir / "intro.md")
    shutil.copytree(BOOK_DIR / "paper_scale", book_dir / "paper_scale", dirs_exist_ok=True)
    link = book_dir / "_toc.yml"
    if not link.is_symlink():
        link.symlink_to("../_toc.yml")
    return book_dir


def chapter_plan(profile: str, *, dataset: str | None = None) -> list[dict[str, Any]]:
    """The chapters of ``profile`` (:func:`ffl.profiles.chapter_entries`): dicts with ``notebook``,
    ``output``, ``parameters`` and ``title``, each notebook checked to exist and each title naming
    its data (``dataset`` replaces the profile's where a chapter takes one)."""
    out = []
    for entry in chapter_entries(profile, dataset=dataset):
        notebook = entry["notebook"]
        if not (NOTEBOOK_DIR / f"{notebook}.ipynb").is_file():
            raise FileNotFoundError(f"profile {profile!r} names notebook {notebook!r}, but "
                                    f"{NOTEBOOK_DIR / (notebook + '.ipynb')} does not exist")
        if entry["title"] is not None:
            entry["title"] = chapter_title(entry["title"], entry["parameters"].get("dataset"), notebook)
        out.append(entry)
    return out


def chapter_title(template: str, dataset: str | None, notebook: str) -> str:
    """A profile's chapter title with ``{data}`` filled from the chapter's ``dataset`` parameter, so
    that the title cannot name data the run did not use (a chapter with a ``dataset`` must say
    ``{data}``; its notebook's name is the dataset a synthetic run stands in for)."""
    if dataset is None:
        return template
    if "{data}" not in template:
        raise ValueError(f"chapter title {template!r} must name its data as {{data}} "
                         f"(filled from dataset={dataset!r})")
    return template.replace("{data}", data_label(dataset, notebook))


def _set_title(nb: nbformat.NotebookNode, title: str) -> None:
    # One notebook can make several chapters (one per architecture): each gets its own H1.
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("# "):
            first, _, rest = cell.source.partition("\n")
            cell.source = f"# {title}\n{rest}"
            return
    raise ValueError("the notebook has no markdown cell starting with a '# ' title")


def _mark_cells(nb: nbformat.NotebookNode) -> None:
    # papermill's injected cell repeats the parameters shown in the provenance table: fold it away.
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" in tags and "hide-cell" not in tags:
            cell.metadata["tags"] = [*tags, "hide-cell"]


def collapse_progress(nb: nbformat.NotebookNode) -> None:
    """Keep what a terminal shows of progress bars: a bar redraws its line after a carriage return,
    and a stored notebook keeps every redraw as an output of its own (456 for one paper-size zoo).
    Consecutive stream outputs of one name become one; each line keeps its last redraw."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.outputs:
            prev = outputs[-1] if outputs else None
            if (out.output_type == "stream" and prev is not None and prev.output_type == "stream"
                    and prev.name == out.name):
                prev.text += out.text
            else:
                outputs.append(out)
        for out in outputs:
            if out.output_type == "stream":
                out.text = "\n".join(_last_redraw(line) for line in out.text.split("\n"))
        cell.outputs = outputs


def _last_redraw(line: str) -> str:
    drawn = [part for part in line.split("\r") if part]
    return drawn[-1] if drawn else ""


def execute_chapter(entry: dict[str, Any], book_dir: Path = BOOK_DIR, *, echo: bool = False) -> Path:
    """Run one chapter with papermill and write it to ``book_dir/chapters/<output>.ipynb``;
    ``echo``: the notebook's own printed output (progress bars included) goes to this process's
    stdout/stderr as it runs, so a log shows where a long run is."""
    target = book_dir / "chapters" / f"{entry['output']}.ipynb"
    params = entry["parameters"]
    with atomic_path(target) as scratch:
        start = time.perf_counter()
        papermill.execute_notebook(
            str(NOTEBOOK_DIR / f"{entry['notebook']}.ipynb"), str(scratch),
            parameters=params, kernel_name="python3", cwd=str(REPO_ROOT), progress_bar=False,
            stdout_file=sys.stdout if echo else None, stderr_file=sys.stderr if echo else None,
        )
        nb = nbformat.read(scratch, as_version=4)
        nb.metadata["ffl"] = {
            **run_info(**{"device": "cpu", **params, "notebook": entry["notebook"]}),  # params may name the device
            "seconds": round(time.perf_counter() - start, 1),
        }
        _mark_cells(nb)
        collapse_progress(nb)
        if entry.get("title"):
            _set_title(nb, entry["title"])
        nbformat.write(nb, scratch)
    return target


def write_run_summary(book_dir: Path = BOOK_DIR, run: dict[str, Any] | None = None) -> Path:
    """``book/run_summary.md``: what produced each chapter, read from the chapters themselves.
    ``run`` (from :func:`run_book`): this run's profile and which chapters it ran, which failed
    (their pages stay those of an earlier run) and which it did not run, stated above the table."""
    head = []
    if run is not None:
        head = [f"Last run ({time.strftime('%Y-%m-%d %H:%M')}, profile `{run['profile']}`): "
                + "; ".join(f"{what}: {', '.join(run[what]) or 'none'}" for what in ("ran", "failed", "not run"))
                + (". **A chapter failed**: its page below, if any, is from an earlier run "
                   f"({run['error']})." if run["failed"] else "."), ""]
    lines = [*head, "| chapter | profile | data | commit | date | hardware | run time |", "|---|---|---|---|---|---|---|"]
    for path in sorted((book_dir / "chapters").glob("*.ipynb")):
        meta = nbformat.read(path, as_version=4).metadata.get("ffl", {})
        lines.append(
            f"| [{path.stem}](chapters/{path.stem}) | {meta.get('profile', '?')} | {meta.get('dataset', '—')} "
            f"| `{meta.get('commit', '?')}` | {meta.get('date', '?')} | {meta.get('hardware', '?')} "
            f"| {meta.get('seconds', '?')} s |"
        )
    out = book_dir / "run_summary.md"
    write_bytes_atomic(out, ("\n".join(lines) + "\n").encode())
    return out


def write_fidelity_page(book_dir: Path = BOOK_DIR) -> Path:
    """``book/fidelity.md``: the fidelity table, generated from :mod:`ffl.fidelity` (never typed)."""
    out = book_dir / "fidelity.md"
    write_bytes_atomic(out, fidelity.page().encode())
    return out


def build_html(book_dir: Path = BOOK_DIR, *, strict: bool = True) -> Path:
    """Regenerate the fidelity page, then ``jupyter-book build`` with warnings as errors; returns
    the HTML folder."""
    write_fidelity_page(book_dir)
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(book_dir)]
    if strict:
        cmd += ["-W", "--keep-going"]
    subprocess.run(cmd, check=True)
    return book_dir.parent / "_build" / "html"


def run_book(profile: str = "smoke", *, only: list[str] | None = None, html: bool = True,
             book_dir: Path | None = None, echo: bool = False, dataset: str | None = None) -> Path:
    """Run the chapters of ``profile`` (or only the outputs in ``only``; ``dataset``: see
    :func:`chapter_plan`) into ``book_dir`` (default: :func:`default_book_dir`), write the run
    summary, then build the HTML unless ``html=False``. Returns the book folder.

    The commit is read once, before the first chapter, and handed to every chapter through
    ``$FFL_COMMIT``: each chapter the run writes dirties the tree, which must not mark the
    chapters after it as run from uncommitted code."""
    plan = chapter_plan(profile, dataset=dataset)
    outputs = [entry["output"] for entry in plan]
    if only is not None and not only:
        raise ValueError(f"only=[] names no chapter; name some of {outputs}, or leave it out to run them all")
    unknown = sorted(set(only or ()) - set(outputs))
    if unknown:
        raise ValueError(f"no chapter {unknown} in profile {profile!r}; its chapters: {outputs}")
    book_dir = Path(book_dir) if book_dir is not None else default_book_dir(profile)
    for folder in (book_dir, book_dir / "chapters"):
        as_folder("book folder", folder)
    book_skeleton(book_dir)
    print(f"[ffl.book] profile {profile!r} → {book_dir}", flush=True)
    run = {"profile": profile, "ran": [], "failed": [], "not run": [], "error": None}
    clean_stale_temp(book_dir / "chapters")  # staging folders of a killed run
    previous = os.environ.get("FFL_COMMIT")
    os.environ["FFL_COMMIT"] = git_commit()
    try:
        for entry in plan:
            if only and entry["output"] not in only:
                continue
            print(f"[ffl.book] running {entry['notebook']} → chapters/{entry['output']}.ipynb "
                  f"with {json.dumps(entry['parameters'])}", flush=True)
            try:
                execute_chapter(entry, book_dir, echo=echo)
            except Exception as e:
                run["failed"].append(entry["output"])
                run["error"] = error_line(e)
                raise
            run["ran"].append(entry["output"])
    finally:  # also after a failure: the summary must not describe the previous run
        if previous is None:
            os.environ.pop("FFL_COMMIT", None)
        else:
            os.environ["FFL_COMMIT"] = previous
        run["not run"] = [o for o in outputs if o not in run["ran"] + run["failed"]]
        write_run_summary(book_dir, run)
    if html:
        print(f"[ffl.book] HTML in {build_html(book_dir)}/index.html")
    return book_dir


def error_line(e: BaseException) -> str:
    """One line saying why a chapter failed: for an error inside the notebook (papermill's
    ``PapermillExecutionError``, whose text starts with a blank line) the notebook's own error and
    the cell it stopped in."""
    if isinstance(e, papermill.PapermillExecutionError):
        line = f"{e.ename}: {e.evalue} (in cell [{e.exec_count}])"
    else:
        line = f"{type(e).__name__}: " + next((t.strip() for t in str(e).splitlines() if t.strip()), "")
    return line.splitlines()[0][:300] if line.strip() else type(e).__name__


def _run_arguments(ap) -> None:
    ap.add_argument("--profile", default="smoke", help="profile whose chapters to run (default: smoke)")
    ap.add_argument("--only", nargs="+", metavar="OUTPUT", help="run only these chapter outputs")
    ap.add_argument("--no-html", action="store_true", help="run the chapters, skip the HTML build")
    ap.add_argument("--html-only", action="store_true", help="skip running chapters; build the HTML")
    ap.add_argument("--echo", action="store_true",
                    help="show each notebook's printed output (progress bars) as it runs")
    ap.add_argument("--book-dir", type=Path, default=None,
                    help="where the chapters go (default: the profile's book_dir, else book/)")
    ap.add_argument("--dataset", default=None,
                    help="run the chapters that take a dataset on this one instead of the profile's "
                         "(e.g. cifar10 in place of CIFAR-100); their titles name it")


def _run(args) -> int:
    if args.html_only:
        book_dir = args.book_dir if args.book_dir is not None else default_book_dir(args.profile)
        print(f"[ffl.book] HTML in {build_html(book_skeleton(book_dir))}/index.html")
        return 0
    run_book(args.profile, only=args.only, html=not args.no_html, book_dir=args.book_dir, echo=args.echo,
             dataset=args.dataset)
    return 0


def _zoos(args) -> int:
    from ffl.costs import zoo_costs

    costs = zoo_costs(args.profile, args.cache_dir, dataset=args.dataset)
    print(costs.to_string(index=False))
    counted = costs[costs.shared == ""]
    missing = int(counted.seconds.isna().sum())
    print(f"\n[ffl.book] {len(counted)} zoos, {int(counted.networks.sum()):,} networks: "
          f"{counted.seconds.sum() / 60:.1f} min of training as recorded"
          + (f"; {missing} not trained yet" if missing else ""))
    return 0


def _zoos_arguments(ap) -> None:
    ap.add_argument("--profile", default="smoke", help="profile whose chapters' zoos to list (default: smoke)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="the zoo cache (default: $FFL_CACHE)")
    ap.add_argument("--dataset", default=None, help="as for run: the dataset in place of the profile's")


def _html(args) -> int:
    book_dir = args.book_dir if args.book_dir is not None else BOOK_DIR
    print(f"[ffl.book] HTML in {build_html(book_dir)}/index.html")
    return 0


COMMANDS = (
    Command("run", "run every chapter of a profile with papermill, then build the HTML", _run_arguments, _run),
    Command("html", "build the HTML from the committed chapters only",
            lambda ap: ap.add_argument("--book-dir", type=Path, default=BOOK_DIR), _html),
    Command("zoos", "every zoo the chapters train, with the training time its cache recorded", _zoos_arguments,
            _zoos),
)


def main(argv: list[str] | None = None) -> int:
    return run_command_line("python -m ffl.book", __doc__.split("\n\n")[0], COMMANDS, argv, default="run")


if __name__ == "__main__":
    raise SystemExit(main())
