# The whole set-up on a fresh machine is one of these two commands:
#   make demo   installs tinylm into .venv and runs every stage that exists on built-in data
#   make test   installs tinylm with its test extras into .venv and runs the test suite
# TORCH pins the PyTorch build (the CPU wheel on a bare machine); override for a GPU:
#   make test TORCH='torch==2.13.0'
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test install install-test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml setup.py $(wildcard tinylm/tokenizer/_c/*) | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]" "$(TORCH)"
	touch $@

install: $(VENV)/.installed

# Until `tinylm quickstart` lands, the demo runs every stage that exists on the built-in
# synthetic world: data -> tokenizer -> pretrain -> finetune -> dpo -> eval -> generate.
DEMO ?= demo
TL := $(BIN)/tinylm
demo: install
	$(TL) data synth -o $(DEMO)/data --force
	$(TL) tokenize $(DEMO)/data/corpus.txt --vocab-size 2048 -o $(DEMO)/tokenizer --force
	$(TL) pretrain --config tiny --data $(DEMO)/data/corpus.txt --tokenizer $(DEMO)/tokenizer \
		-o $(DEMO)/base --max-steps 300 --set train.batch_tokens=4096 --set train.warmup_steps=30 \
		--set train.eval_every=100 --force
	$(TL) finetune --base $(DEMO)/base --data $(DEMO)/data/sft.jsonl \
		--val-data $(DEMO)/data/sft_eval.jsonl -o $(DEMO)/sft --max-steps 150 --force
	$(TL) dpo --base $(DEMO)/sft --data $(DEMO)/data/prefs.jsonl \
		--val-data $(DEMO)/data/prefs_eval.jsonl -o $(DEMO)/dpo --max-steps 60 --force
	$(TL) eval --model $(DEMO)/dpo --data $(DEMO)/data/corpus.txt
	$(TL) generate --model $(DEMO)/dpo --chat --temperature 0 "$$($(BIN)/python -c \
		'import json,sys; print(json.loads(open(sys.argv[1]).readline())["messages"][0]["content"])' \
		$(DEMO)/data/sft_eval.jsonl)"

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/pip install -q -e ".[bench]" "$(TORCH)"
	$(BIN)/python bench/tokenizer.py
	$(BIN)/python bench/pretrain.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/dpo.py

lint: install
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check tinylm tests bench

clean:
	rm -rf $(VENV) build *.egg-info
