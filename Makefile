# The whole set-up on a fresh machine is one of these two commands:
#   make demo   installs tinylm into .venv and runs `tinylm quickstart` (every stage, ~10 min)
#   make test   installs tinylm with its test extras into .venv and runs the test suite
# TORCH pins the PyTorch version; pip takes it from the configured index (on a stock PyPI for
# Linux x86_64 that is the CUDA build). TORCH_INDEX, when set, is the index pip installs it from:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu   (the CPU wheel, 2.13.0+cpu)
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test install install-test bench lint clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml setup.py $(wildcard tinylm/tokenizer/_c/*) | $(BIN)/python
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]" "$(TORCH)"
	touch $@

install: $(VENV)/.installed

# The demo is `tinylm quickstart`: synthetic world -> tokenizer -> pretrain -> finetune (full
# and LoRA) -> dpo -> every model scored; DEMO/report.md says what each stage achieved.
DEMO ?= demo
demo: install
	$(BIN)/tinylm quickstart -o $(DEMO) --force

# The tokenizer tests run twice: with the C accelerator, then on the pure-Python path.
test: install browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	TINYLM_PURE_PYTHON=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_tokenizer.py \
		tests/test_tokenizer_cli.py tests/test_tokenizer_interop.py

# The chat page's browser test drives Debian's chromium + chromium-driver. Installed here only
# when running as root with apt-get and not there yet; a failure is not fatal (the test skips).
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -q && apt-get install -y -q chromium chromium-driver) \
			|| echo "could not install chromium: the browser test will skip"; \
	fi

bench: install
	$(BIN)/pip install -q -e ".[bench]" "$(TORCH)"
	$(BIN)/python bench/tokenizer.py
	$(BIN)/python bench/pretrain.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/dpo.py
	$(BIN)/python bench/serve.py

lint: install
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check tinylm tests bench

clean:
	rm -rf $(VENV) build *.egg-info tinylm/tokenizer/_fastbpe*.so
