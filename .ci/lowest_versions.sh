#!/usr/bin/env bash
# CI: the lowest declared versions. A fresh virtual environment gets every dependency of pyproject.toml (core and
# the extras `make` installs) at the lower bound it declares, then runs a smoke subset of the tests: the lower bounds
# are promises that this step checks. Python is the one CI has (python3); see pyproject.toml for the minimum's check.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LOWEST_VENV:-.venv-lowest}
start=$(date +%s)
rm -rf "$VENV"
python3 -m venv "$VENV"
python3 .ci/lowest_constraints.py all test > "$VENV/constraints.txt"
echo "lowest versions: $(tr '\n' ' ' < "$VENV/constraints.txt")"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$VENV/constraints.txt" -e '.[all,test]'
echo "installed in $(( $(date +%s) - start )) s"
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null | grep -iE "^(torch|transformers|tokenizers|diffusers|peft|accelerate|numpy|huggingface.hub) " || true
# the smoke subset: the CLI and config, model loading and a run per family, export, the lowest-risk API surfaces
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests/test_lowest_smoke.py}"
echo "lowest versions: $(( $(date +%s) - start )) s in all"
