# make install builds .venv idempotently; every other target depends on it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU build that lies on disk (see DESIGN.md); the project range then admits it.
	$(BIN)/pip install -q "torch==2.13.0" "numpy<2"
	$(BIN)/pip install -q -e ".[dev,harness]"
	touch $(STAMP)

install: $(STAMP) browser

# Debian's headless Chromium and its driver for the user page's browser test (tests/stream/test_user_page.py),
# only where apt-get runs as root (CI, these machines) and only once; elsewhere that test is skipped.
browser:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! (command -v chromium && command -v chromedriver) >/dev/null; then \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; \
	fi

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
