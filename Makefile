# The two commands of the README: `make book` and `make test`. Each sets up .venv on first use.
PY ?= python3.11
VENV ?= .venv
PROFILE ?= smoke

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
