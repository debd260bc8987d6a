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
	@echo "== demo 1/5: driving data (expert episodes, in distribution and out of distribution)"
	$(BIN)/unified data generate --suite recipes/data/train.yaml --episodes 200 --out $(DEMO_DIR)/data/train --workers $(WORKERS)
	$(BIN)/unified data generate --suite recipes/data/ood.yaml --episodes 50 --out $(DEMO_DIR)/data/ood --workers $(WORKERS)
	$(BIN)/unified data info $(DEMO_DIR)/data/train
	$(BIN)/unified data info $(DEMO_DIR)/data/ood
	@echo "== demo 2/5: operator (multi-hop reasoning) data"
	$(BIN)/unified data operators --out $(DEMO_DIR)/data/operators --hops 2-6 --scratchpad inductive --n 2000
	@echo "== demo 3/5: tokenizers (image FSQ autoencoder, sentencepiece text, action bins and FAST) and token shards"
	$(BIN)/unified tokenizer fit --data $(DEMO_DIR)/data/train --operators $(DEMO_DIR)/data/operators --out $(DEMO_DIR)/tokenizers
	$(BIN)/unified tokenizer eval --tokenizer $(DEMO_DIR)/tokenizers --data $(DEMO_DIR)/data/train
	$(BIN)/unified tokenizer eval --tokenizer $(DEMO_DIR)/tokenizers --data $(DEMO_DIR)/data/ood
	$(BIN)/unified data tokenize --data $(DEMO_DIR)/data/train --tokenizer $(DEMO_DIR)/tokenizers --out $(DEMO_DIR)/shards \
		--operators $(DEMO_DIR)/data/operators --tasks policy_reason,policy,world,text
	$(BIN)/unified data inspect $(DEMO_DIR)/shards --dump 0
	@echo "== demo 4/5: baselines in closed loop (expert, random, constant speed)"
	for model in expert random constant; do for suite in train ood; do \
		$(BIN)/unified eval closed-loop --model $$model --scenarios recipes/data/$$suite.yaml --episodes 20 \
			--workers $(WORKERS) --json $(DEMO_DIR)/eval/$${model}_$$suite.json || exit 1; done; done
	$(BIN)/unified eval compare $(foreach s,train ood,$(foreach m,expert random constant,$(DEMO_DIR)/eval/$(m)_$(s).json))
	@echo "== demo 5/5: done. Data in $(DEMO_DIR)/data (train, ood, operators), tokenizers in $(DEMO_DIR)/tokenizers, baseline reports in $(DEMO_DIR)/eval"

clean:
	rm -rf $(VENV) build *.egg-info runs
