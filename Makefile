# The two set-up commands of the README: `make serve` and `make test`.
# Both create .venv on first use (Python >= 3.10 as python3) and reinstall
# when pyproject.toml changes.

VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

serve: $(BIN)/.installed
	$(BIN)/ci-receiver serve

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	# The documentation site (mkdocs.yml, into build/site): a broken link, anchor or
	# snippet, or a reference page that cannot be made from the code, fails.
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	$(BIN)/python -m pytest
