# The README's two commands. Both create .venv if missing, install what they need (pinned pip
# packages; system packages through apt-get when missing and we are root) and are idempotent:
# a second run only re-installs when requirements.txt or pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSTEM_PACKAGES := fuse3 libfuse3-dev pkg-config postgresql
PYTEST_ARGS ?=

.PHONY: demo test gpu install system-packages clean

demo: install
	$(VENV)/bin/openinfra demo

test: install
	$(PY) -m pytest -n auto --dist worksteal $(PYTEST_ARGS)

# What one call on the GPU machine runs (see README "GPU work"): uses the image's python3.
gpu:
	bash scripts/gpu.sh

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@$(MAKE) --no-print-directory system-packages
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing system packages:$$missing"; \
			(apt-get install -y -q $$missing >/dev/null 2>&1 || (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null)); \
		else \
			echo "warning: missing system packages:$$missing (not root or no apt-get); the tests that need them skip with the reason"; \
		fi; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache
