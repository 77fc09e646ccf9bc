"""``python -m ffl.bench``: the command line of :mod:`ffl.bench.cli`."""
from ffl.bench.cli import main

raise SystemExit(main())
