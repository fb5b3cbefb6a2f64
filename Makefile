# The two commands of the README are `make demo` and `make test`; everything else here serves them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONHASHSEED := 0
# nbdev_test runs every notebook headless; NCF_SMALL makes them pick their small-data settings.
export NCF_SMALL ?= 1

.PHONY: demo test install sysdeps check nbtest pytest docs export clean-nbs readme lock wheels clean

demo: $(STAMP)
	$(BIN)/python -m ncf.cli.demo

test: sysdeps $(STAMP)
	@$(BIN)/python -m tools.repo check
	@$(MAKE) --no-print-directory nbtest
	@$(MAKE) --no-print-directory pytest

install: $(STAMP)

# One venv, installed from setup.py's extras under the exact pins of constraints.txt.
# The stamp makes a second run reuse the venv; it is redone when the install inputs change.
$(STAMP): setup.py settings.ini constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# System packages the tests need: Java 17 for PySpark, Chromium and its driver for the browser test, Redis for the feature store's.
sysdeps:
	@missing=""; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

check: $(STAMP)
	$(BIN)/python -m tools.repo check

nbtest: $(STAMP)
	$(BIN)/nbdev_test --n_workers 2 --timing

pytest: $(STAMP)
	$(BIN)/python -m pytest tests -q $(PYTEST_ARGS)

# Developer helpers: regenerate what `check` verifies.
export: $(STAMP)
	$(BIN)/nbdev_export
clean-nbs: $(STAMP)
	$(BIN)/nbdev_clean
readme: $(STAMP)
	$(BIN)/python -m tools.repo readme

# The docs site, offline (no Quarto): every notebook executed on small data and rendered to _site/.
docs: $(STAMP)
	$(BIN)/python -m tools.docs --out _site

# What ships to AWS installs offline: the containers' wheelhouse (build/wheels/KEY/, for the DLC's Python 3.11 and
# platform) and the Lambda's boto3 (build/lambda/KEY/), both keyed by their inputs and reused (ncf.pipeline.bundle).
wheels: $(STAMP)
	$(BIN)/python -c 'from ncf.pipeline.bundle import wheelhouse, lambda_site; print(wheelhouse()); print(lambda_site())'

# Rewrite constraints.txt from the current venv (after changing a requirement on purpose).
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV) _docs _site .pytest_cache
