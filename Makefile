# Two commands do all the set-up themselves: `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench install clean

run: $(STAMP)
	$(BIN)/kfopt run --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q examples/kfopt-cluster/tests  # the example plugin, as its author runs it

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/techniques.py

install: $(STAMP)

# Re-install whenever a pyproject.toml or the pins change; the pins (constraints.txt) are the image's,
# so tests run on the versions the image ships.
$(STAMP): pyproject.toml constraints.txt examples/kfopt-cluster/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]' -e ./examples/kfopt-cluster
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs *.egg-info
