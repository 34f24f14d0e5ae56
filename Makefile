# The two set-up commands: `make run` and `make test`. Both work on a fresh machine.
PY      := python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: run test install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/shoal dev

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .shoal-dev
