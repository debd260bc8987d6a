# `make test` and `make demo` build .venv on first use, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The editable install is "strict" (a link tree), so it must be redone when a source file is added or removed.
SOURCES := pyproject.toml $(sort $(shell find unified tokenizers eval -name '*.py' 2>/dev/null))
DEMO_DIR ?= runs/demo
WORKERS ?= 2

.PHONY: test demo lint clean

$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing unified and its dependencies into $(VENV) (log: $(VENV)/install.log)"
	$(BIN)/python -m pip install -e '.[dev]' --config-settings editable_mode=strict > $(VENV)/install.log 2>&1 \
		|| { tail -40 $(VENV)/install.log; exit 1; }
	$(BIN)/python -c "import unified, transformers, deepspeed, highway_env"
	touch $@

lint: $(VENV)/.installed
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

demo: $(VENV)/.installed
	$(BIN)/unified data generate --suite recipes/data/train.yaml --episodes 200 --out $(DEMO_DIR)/data/train --workers $(WORKERS)
	$(BIN)/unified data generate --suite recipes/data/ood.yaml --episodes 50 --out $(DEMO_DIR)/data/ood --workers $(WORKERS)
	$(BIN)/unified data info $(DEMO_DIR)/data/train
	$(BIN)/unified data info $(DEMO_DIR)/data/ood
	$(BIN)/unified data operators --out $(DEMO_DIR)/data/operators --hops 2-6 --scratchpad inductive --n 2000
	$(BIN)/unified eval closed-loop --model random --scenarios recipes/data/train.yaml --episodes 20 --workers $(WORKERS) --json $(DEMO_DIR)/eval/random_train.json
	$(BIN)/unified eval closed-loop --model constant --scenarios recipes/data/train.yaml --episodes 20 --workers $(WORKERS) --json $(DEMO_DIR)/eval/constant_train.json
	@echo "demo: data in $(DEMO_DIR)/data (train, ood, operators), baselines in $(DEMO_DIR)/eval"

clean:
	rm -rf $(VENV) build *.egg-info runs
