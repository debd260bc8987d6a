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

# The demo's expensive stages are file targets: rerunning `make demo` skips what is already there.
D := $(DEMO_DIR)
demo: $(VENV)/.installed
	@echo "== demo 1/6: driving data (expert episodes, in distribution and out of distribution)"
	$(BIN)/unified data generate --suite recipes/data/train.yaml --episodes 200 --out $(D)/data/train --workers $(WORKERS)
	$(BIN)/unified data generate --suite recipes/data/ood.yaml --episodes 50 --out $(D)/data/ood --workers $(WORKERS)
	$(BIN)/unified data info $(D)/data/train
	$(BIN)/unified data info $(D)/data/ood
	@echo "== demo 2/6: operator (multi-hop reasoning) data"
	$(BIN)/unified data operators --out $(D)/data/operators --hops 2-6 --scratchpad inductive --n 2000
	@echo "== demo 3/6: tokenizers (image FSQ autoencoder, sentencepiece text, action bins and FAST) and token shards"
	$(MAKE) --no-print-directory $(D)/tokenizers/layout.json $(D)/shards/meta.json
	$(BIN)/unified tokenizer eval --tokenizer $(D)/tokenizers --data $(D)/data/train
	$(BIN)/unified tokenizer eval --tokenizer $(D)/tokenizers --data $(D)/data/ood
	$(BIN)/unified data inspect $(D)/shards --dump 0
	@echo "== demo 4/6: joint training through the DeepSpeed launcher on 2 ranks"
	$(MAKE) --no-print-directory $(D)/joint/checkpoints/latest
	$(BIN)/unified eval plot-training $(D)/joint --out $(D)/joint/loss.png
	$(BIN)/unified export --checkpoint $(D)/joint --out $(D)/export/joint
	@echo "== demo 5/6: baselines in closed loop (expert, random, constant speed)"
	for model in expert random constant; do for suite in train ood; do \
		$(BIN)/unified eval closed-loop --model $$model --scenarios recipes/data/$$suite.yaml --episodes 20 \
			--workers $(WORKERS) --json $(D)/eval/$${model}_$$suite.json || exit 1; done; done
	$(BIN)/unified eval compare $(foreach s,train ood,$(foreach m,expert random constant,$(D)/eval/$(m)_$(s).json))
	@echo "== demo 6/6: done. Data in $(D)/data, tokenizers in $(D)/tokenizers, the joint run in $(D)/joint \
	(loss plot $(D)/joint/loss.png, export $(D)/export/joint), baseline reports in $(D)/eval"

$(D)/tokenizers/layout.json:
	$(BIN)/unified tokenizer fit --data $(D)/data/train --operators $(D)/data/operators --out $(D)/tokenizers

$(D)/shards/meta.json: $(D)/tokenizers/layout.json
	$(BIN)/unified data tokenize --data $(D)/data/train --tokenizer $(D)/tokenizers --out $(D)/shards \
		--operators $(D)/data/operators --tasks policy_reason,policy,world,text

$(D)/joint/checkpoints/latest: $(D)/shards/meta.json
	$(BIN)/unified train --recipe recipes/joint.yaml --ranks 2 run_dir=$(D)/joint data=$(D)/shards

clean:
	rm -rf $(VENV) build *.egg-info runs
