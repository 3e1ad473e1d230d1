# make install builds .venv idempotently; every other target depends on it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU build that lies on disk (see DESIGN.md); the project range then admits it.
	$(BIN)/pip install -q "torch==2.13.0" "numpy<2"
	$(BIN)/pip install -q -e ".[dev,harness]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/mind demo

test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
