# The two commands: `make run` and `make test`. Both work on a fresh Debian 12
# machine (root, Python 3.11): they create .venv and install what is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SRC := src tests benchmarks

# Debian packages the test suite drives as real components (and what pyfuse3 builds with).
APT_PACKAGES := nix-bin b3sum fuse3 libfuse3-dev pkg-config gcc python3-dev attr postgresql \
	chromium chromium-driver

.PHONY: run test lint fmt bench bytecode system-deps protos protos-check venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml | system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,fuse,otel]'
	touch $@

system-deps:
	@missing=""; \
	for pkg in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "ok installed" || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

lint: $(STAMP)
	$(BIN)/ruff format --check $(SRC)
	$(BIN)/ruff check $(SRC)
	$(BIN)/mypy $(SRC)
	$(BIN)/lint-imports
	$(MAKE) --no-print-directory protos-check

fmt: $(STAMP)
	$(BIN)/ruff format $(SRC)
	$(BIN)/ruff check --fix $(SRC)

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

protos-check: $(STAMP)
	$(BIN)/python scripts/gen_protos.py --check

test: system-deps $(STAMP) lint
	$(BIN)/pytest -q

# Bytecode is compiled up front: where PYTHONDONTWRITEBYTECODE is set (as on
# these machines), every CLI process would otherwise recompile our modules.
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q src >/dev/null

bench: system-deps $(STAMP) bytecode
	$(BIN)/python -m benchmarks

run: $(STAMP) bytecode
	@echo "tvix-store: gRPC daemon + nar-bridge on the embedded store (TVIX_STORE_HOME, default ~/.local/share/tvix-store); Ctrl-C stops it"
	$(BIN)/tvix-store daemon --nar-bridge "[::1]:9000"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
