# The two commands of the README: `make book` and `make test`. Each sets up .venv on first use.
#   make book                      the book people read: every chapter at the laptop profile
#                                  (up to about 2 hours on 2 shared CPU cores from scratch; minutes from the
#                                  caches), written to book/chapters, then the HTML
#   make book PROFILE=smoke        a quick check; goes to _build/smoke/, never to book/
#   make test                      unit tests, the whole smoke book (in a temporary folder), the HTML
# Data: $(FFL_DATA_ROOT) — by default ../shared/data when that folder exists, else ./data; a
# missing real dataset is downloaded (checksummed) on a machine with a network.
PY ?= python3.11
VENV ?= .venv
PROFILE ?= laptop
FFL_DATA_ROOT ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),data)
export FFL_DATA_ROOT

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

.PHONY: book test html
book: $(VENV)/.installed  ## run every chapter with papermill at PROFILE, then build the HTML
	$(VENV)/bin/python -m ffl.book run --profile $(PROFILE)

html: $(VENV)/.installed  ## build the HTML from the committed chapters only
	$(VENV)/bin/python -m ffl.book html

test: $(VENV)/.installed  ## unit tests, every notebook at the smoke profile, and the book build
	$(VENV)/bin/python -m pytest -m "" -ra
