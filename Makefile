# The two commands of the README: `make run` (set up and start) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080

# rapidocr-onnxruntime depends on the GUI build of OpenCV, which needs libGL and X libraries that a
# fresh Debian lacks; the headless build of the same version needs none. pip re-adds the GUI build on
# every install of the project, so each install is followed by this swap.
HEADLESS_OPENCV = $(BIN)/pip uninstall --quiet -y opencv-python && \
	$(BIN)/pip install --quiet --force-reinstall --no-deps opencv-python-headless

.PHONY: run setup test bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(HEADLESS_OPENCV)
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	$(HEADLESS_OPENCV)
	touch $@

setup: $(VENV)/.installed
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py ensure_admin

run: setup
	$(BIN)/python manage.py serve --host $(HOST) --port $(PORT)

# Two processes (pytest-xdist) on 2 cores: 6 minutes instead of 9. A file's tests stay in one process, in
# order, sharing its module fixtures (a browser test module's server). Every test already has its own
# ports, data directory, PostgreSQL database and Redis prefix or database.
TEST_PROCESSES ?= 2

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/pipeline_bench.py
	$(BIN)/python bench/fleet_bench.py
	$(BIN)/python bench/fair_queue_bench.py
	$(BIN)/python bench/bench_builtin.py
	$(BIN)/python bench/bench_cpu_scans.py
	$(BIN)/python bench/bench_searchable_pdf.py
	$(BIN)/python bench/live_latency_bench.py --watch-all
