# Two commands on a fresh machine: `make run` (the default model answers a question) and `make test`.
# torch is pinned to 2.13.0 and installed first: on these CPU machines that resolves to the local
# CPU build; an unpinned torch would pull several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvloom-installed

.PHONY: install run test bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/kvloom generate "What is the capital of France?"

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q

bench: install
	$(BIN)/kvloom bench throughput --num-prompts 64

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
