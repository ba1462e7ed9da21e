# The two set-up commands of the README: `make serve` and `make test`.
# Both create .venv on first use (Python 3.11 as python3) and reinstall
# when pyproject.toml or the lock changes: the dependencies exactly as locked
# in requirements/dev.txt (every file checked against its hash), then the
# project itself, editable, built with the locked setuptools.
# `make lock` refreshes the locks (requirements/*.txt) after pyproject.toml
# changes, keeping every pin it can; `make lock UPGRADE=1` takes the newest
# releases pyproject.toml allows.

VENV := .venv
BIN := $(VENV)/bin
# What the locks are for: CPython 3.11 on Linux x86_64, the image's (Dockerfile) and
# the development machines'.
LOCK_FOR := --python-version 3.11 --python-platform x86_64-manylinux_2_28
COMPILE := $(BIN)/uv pip compile --quiet --generate-hashes $(LOCK_FOR) \
	--custom-compile-command "make lock"

.PHONY: serve test lock

$(BIN)/.installed: pyproject.toml requirements/dev.txt
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
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

# dev.txt: the test extra (and the extras it pulls), what `make` installs; image.txt:
# what the image runs, at dev.txt's versions; build.txt: what builds the project's
# wheel in the image ([build-system] requires).
lock: $(BIN)/.installed
	$(COMPILE) $(if $(UPGRADE),--upgrade) pyproject.toml --extra test -o requirements/dev.txt
	$(COMPILE) pyproject.toml --extra postgres --extra mysql --extra otel \
		--constraint requirements/dev.txt -o requirements/image.txt
	$(BIN)/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'], sep='\n')" \
		| $(COMPILE) - --constraint requirements/dev.txt -o requirements/build.txt
