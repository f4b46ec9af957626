#!/usr/bin/env bash
# CI: the lowest declared versions, and the minimum Python. A virtual environment gets every dependency of
# pyproject.toml (the core ones and those of the extras `make` installs) at the lower bound it declares, and runs a
# smoke subset of the tests on this checkout's sources: the lower bounds are promises that this step checks.
# The environment is kept per set of pins (OBLIVIATE_CI_CACHE), so only a change of bounds pays the install again.
# Measured on these machines (2026-12-02): the install 312 s from PyPI, then vermin and the smoke tests 40 s (72
# tests on an idle machine; about 2 min on a busy one).
# No Python 3.10 can be installed here (Debian has 3.11 only, PyPI ships no interpreter), so the minimum Python
# (requires-python) is checked statically: vermin finds any syntax or standard-library use newer than 3.10.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
pins=$(python3 .ci/lowest_constraints.py all test)
key=$( (echo "$pins"; python3 --version) | sha256sum | cut -c1-12)
VENV=${OBLIVIATE_CI_CACHE:-$HOME/.cache/obliviate-ci}/lowest-$key
echo "lowest versions: $(echo "$pins" | tr '\n' ' ')"
if [ ! -f "$VENV/.installed" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  echo "$pins" > "$VENV/constraints.txt"
  # the pins as requirements and as constraints: pip may not move them to satisfy another package
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$VENV/constraints.txt" \
    -c "$VENV/constraints.txt" "vermin==1.9.2"
  touch "$VENV/.installed"
  echo "installed in $(( $(date +%s) - start )) s"
fi
"$VENV/bin/vermin" --no-tips --violations --eval-annotations -t=3.10- src tests .ci
# the smoke subset: this packaging's own tests (the CLI, extras, a language-model run, export with its card, the
# curves), the config, the language-model and vision-language adapters, the chat templates, text-to-image runs
[ $# -gt 0 ] || set -- tests/test_packaging.py tests/test_cli_and_config.py tests/test_adapter.py \
  tests/test_templates.py tests/test_vlm_adapter.py tests/test_t2i_runs.py
PYTHONPATH=$PWD/src OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
echo "lowest versions: $(( $(date +%s) - start )) s in all"
