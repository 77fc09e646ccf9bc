"""The maps stay current: every module of ``ffl/`` is in DESIGN.md's tree and in the README's
library map, and neither names a module that is gone. Reads files only (no imports of ``ffl``)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def library_modules() -> set[str]:
    """``ffl/**/*.py`` as paths relative to ``ffl/``, without ``__init__``/``__main__``."""
    return {p.relative_to(ROOT / "ffl").as_posix() for p in (ROOT / "ffl").rglob("*.py")
            if p.stem not in ("__init__", "__main__")}


def design_tree() -> set[str]:
    """The files DESIGN.md's module tree names, as paths relative to ``ffl/`` (folders by indentation)."""
    text = (ROOT / "DESIGN.md").read_text()
    block = re.search(r"```\nffl/\n(.*?)```", text, re.S)
    assert block, "DESIGN.md has no ```ffl/ ...``` module tree"
    folders: list[tuple[int, str]] = []  # (indentation, folder name) of the folders enclosing a line
    files = set()
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        indent, name = len(line) - len(line.lstrip()), line.split()[0]
        folders = [(i, f) for i, f in folders if i < indent]
        if name.endswith("/"):
            folders.append((indent, name.rstrip("/")))
        elif name.endswith(".py"):
            files.add("/".join([f for _, f in folders] + [name]))
    return files


def readme_map() -> set[str]:
    """The ``ffl.…`` names in the first column of the README's library table (under "## The library")."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## The library\n", 1)[1].split("\n## ", 1)[0]
    return {m for row in section.splitlines() if row.startswith("| `ffl")
            for m in re.findall(r"`(ffl(?:\.\w+)+)`", row.split("|")[1])}


def dotted(rel: str) -> str:
    return "ffl." + rel.removesuffix(".py").replace("/", ".")


def test_every_module_is_in_the_design_tree_and_the_tree_names_no_missing_file():
    modules, tree = library_modules(), design_tree()
    assert not modules - tree, f"modules missing from DESIGN.md's tree: {sorted(modules - tree)}"
    stale = {f for f in tree - modules if not f.endswith(("__init__.py", "__main__.py"))}
    assert not stale, f"DESIGN.md's tree names files that do not exist: {sorted(stale)}"


def test_every_module_is_in_the_readme_library_map_and_the_map_names_no_missing_module():
    modules, named = {dotted(m) for m in library_modules()}, readme_map()
    packages = {dotted(p.parent.relative_to(ROOT).as_posix().removeprefix("ffl/") + ".py")
                for p in (ROOT / "ffl").rglob("__init__.py") if p.parent != ROOT / "ffl"}
    assert not modules - named, f"modules missing from README's library map: {sorted(modules - named)}"
    stale = named - modules - packages
    assert not stale, f"README's library map names modules that do not exist: {sorted(stale)}"


def test_the_readme_links_the_design_and_the_docs_it_moved_out():
    readme = (ROOT / "README.md").read_text()
    for target in ("DESIGN.md", "docs/performance.md", "docs/gpu.md", "docs/datasets.md"):
        assert f"]({target}" in readme, target
        assert (ROOT / target).is_file(), target
