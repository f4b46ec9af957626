# Set-up and the two main jobs. `make demo` and `make test` each create .venv and install what they need first.
# TORCH: the CPU wheel pin that these machines hold locally; on a GPU machine see the README.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
TOFU_DIR ?=
FULL_SIZE ?=

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[all,test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/obliviate demo $(if $(TOFU_DIR),--tofu-dir $(TOFU_DIR)) $(if $(FULL_SIZE),--full-size)

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

# the lowest versions pyproject.toml declares, in their own environment, and the minimum Python (.ci/)
test-lowest:
	bash .ci/lowest_versions.sh

.PHONY: install demo test test-slow test-lowest
