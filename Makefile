# The two set-up commands: `make run` and `make test`. Both work on a fresh machine.
PY      := python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Debian packages the tests need beyond Python; installed with apt-get when missing.
TEST_DEBS := openssh-server openssh-client bind9-dnsutils dnsperf iproute2 etcd-server chromium chromium-driver prometheus

.PHONY: run test install test-deps clean

$(BIN)/python:
	@$(PY) -c 'import venv, ensurepip' 2>/dev/null || { apt-get update -qq && apt-get install -y -qq python3-venv; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# --no-compile: byte-compiling every module of every package took half of the install (30 s
# of 60); Python compiles the modules that are imported, once, as they are.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --no-compile -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test-deps:
	@missing=$$(for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $$missing; fi

run: install
	$(BIN)/shoal dev

test: install test-deps
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .shoal-dev
