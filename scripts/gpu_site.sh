#!/usr/bin/env bash
# Pack the Python packages the GPU machine lacks (papermill, its python3 kernel ipykernel, and what
# `from myst_nb import glue` imports) into one small xz tarball that travels with the tree.
#
#   bash scripts/gpu_site.sh [WHEEL_DIR] [TARBALL]   # defaults: the repository's .whl, .gpu/site.tar.xz
#
# WHEEL_DIR holds py3.12 x86-64 wheels (see docs/gpu.md); only KEEP below is installed, unpacked for
# CPython 3.12 with pip --target (local files, no index), then stripped of what never runs:
# bytecode, tests, console scripts, type stubs, C headers, install records, IPython's Sphinx
# extension, docutils' writers, parsers and math (myst_nb's glue imports docutils.nodes alone) and
# the debug symbols of extension modules.
# gpu_chapter.sh unpacks it into /tmp/site. The machine's own python3 already has the rest
# (torch, numpy, pandas, matplotlib, pyyaml, pygments, requests, click, tqdm, aiohttp, attrs, ...).
#
# Wheels of the folder left out on purpose: sphinx and its extensions, babel, alabaster,
# snowballstemmer, imagesize, roman_numerals, myst_parser, mdit_py_plugins, jupyter_cache,
# sqlalchemy (myst-nb's build side; glue does not import them), jupytext (ffl.book does not call
# it), debugpy (ipykernel runs without it: no debugger), jedi and parso (IPython completes
# without them), prompt_toolkit and wcwidth (IPython's terminal, which a kernel never imports),
# importlib_metadata and lazy_importer (the standard library's importlib.metadata).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
WHL="$(realpath "${1:-$root/.whl}")"
TARBALL="$(realpath -m "${2:-$root/.gpu/site.tar.xz}")"
PYTHON="${PYTHON:-python3}"
KEEP="papermill entrypoints tenacity nbclient nbformat fastjsonschema jsonschema
  jsonschema_specifications referencing rpds_py jupyter_core platformdirs traitlets jupyter_client
  pyzmq tornado ipykernel comm matplotlib_inline nest_asyncio2 ipython ipython_pygments_lexers
  pexpect ptyprocess stack_data executing asttokens pure_eval myst_nb docutils"
wheels=()
for name in $KEEP; do
  found=("$WHL/$name"-[0-9]*.whl)
  [ ${#found[@]} -eq 1 ] && [ -f "${found[0]}" ] || { echo "need exactly one $name wheel in $WHL" >&2; exit 1; }
  wheels+=("${found[0]}")
done
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
"$PYTHON" -m pip install -q --no-deps --no-compile --no-index --target "$stage/site" \
  --python-version 3.12 --implementation cp --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 "${wheels[@]}"
cd "$stage/site"
rm -rf bin share docutils/writers docutils/parsers docutils/utils/math IPython/sphinxext \
  jsonschema/benchmarks ./*.dist-info/sboms
find . -depth -type d \( -name __pycache__ -o -name tests -o -name test \) -exec rm -rf {} +
find . -type f \( -name '*.pyc' -o -name '*.pyi' -o -name '*.pxd' -o -name '*.pxi' -o -name '*.h' \
  -o -path '*.dist-info/RECORD' -o -path '*.dist-info/INSTALLER' -o -path '*.dist-info/REQUESTED' \
  -o -path '*.dist-info/direct_url.json' \) -delete
for so in $(find . -name '*.so' -type f); do  # wheels ship some with debug info; the rest stay as built
  if file "$so" | grep -q 'not stripped'; then strip --strip-unneeded "$so"; fi
done
mkdir -p "$(dirname "$TARBALL")"
tar --sort=name --owner=0 --group=0 --mtime=2020-01-01 -cf - . | xz -9 -T1 > "$TARBALL.tmp"
mv "$TARBALL.tmp" "$TARBALL"
echo "$TARBALL: $(stat -c %s "$TARBALL") bytes ($(du -sh . | cut -f1) unpacked)"
