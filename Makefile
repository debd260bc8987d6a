# `make test` and `make demo` build .venv on first use, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The editable install is "strict" (a link tree), so it must be redone when a source file is added or removed.
SOURCES := pyproject.toml $(sort $(shell find unified tokenizers eval -name '*.py' 2>/dev/null))
DEMO_DIR ?= runs/demo
WORKERS ?= 2
# Closed-loop episodes per scenario in the study (fewer: a quicker, coarser look; the README's figures use 30).
STUDY_EPISODES ?= 30

.PHONY: test demo operators dagger ablation action-tokens lint clean

$(VENV)/.installed: $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing unified and its dependencies into $(VENV) (log: $(VENV)/install.log)"
	$(BIN)/python -m pip install -e '.[dev]' --config-settings editable_mode=strict > $(VENV)/install.log 2>&1 \
		|| { tail -40 $(VENV)/install.log; exit 1; }
	$(BIN)/python -c "import unified, transformers, deepspeed, highway_env"
	touch $@

lint: $(VENV)/.installed
	$(BIN)/ruff check .

# Two pytest workers, each running whole test files (the files that train share fixtures and fixed ports).
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=10

# The demo's expensive stages are file targets or resumable: rerunning `make demo` skips what is already there.
D := $(DEMO_DIR)
demo: $(VENV)/.installed
	@echo "== $$(date +%T) demo 1/6: driving data (expert episodes, in distribution and out of distribution)"
	$(BIN)/unified data generate --suite recipes/data/train.yaml --episodes 250 --out $(D)/data/train --workers $(WORKERS)
	$(BIN)/unified data generate --suite recipes/data/ood.yaml --episodes 40 --out $(D)/data/ood --workers $(WORKERS) \
		--held-out-every 1
	$(BIN)/unified data info $(D)/data/train
	$(BIN)/unified data info $(D)/data/ood
	@echo "== $$(date +%T) demo 2/6: operator (multi-hop reasoning) data"
	$(BIN)/unified data operators --out $(D)/data/operators --hops 2-6 --scratchpad inductive --n 2000
	@echo "== $$(date +%T) demo 3/6: tokenizers (image FSQ autoencoder, sentencepiece text, action bins and FAST) and token shards"
	$(MAKE) --no-print-directory $(D)/tokenizers/layout.json $(D)/shards/meta.json
	$(BIN)/unified tokenizer eval --tokenizer $(D)/tokenizers --data $(D)/data/train
	$(BIN)/unified tokenizer eval --tokenizer $(D)/tokenizers --data $(D)/data/ood
	$(BIN)/unified data inspect $(D)/shards --dump 0
	@echo "== $$(date +%T) demo 4/6: the reasoning teacher: joint training through the DeepSpeed launcher on 2 ranks"
	$(MAKE) --no-print-directory $(D)/joint/checkpoints/latest
	$(BIN)/unified eval plot-training $(D)/joint --out $(D)/joint/loss.png
	@echo "== $$(date +%T) demo 5/6: the distillation study: action-only students, closed loop in and out of distribution, report"
	$(BIN)/unified eval distill --study recipes/study.yaml --out $(D)/study teacher.run_dir=$(D)/joint \
		data=$(D)/shards stores.in_distribution=$(D)/data/train stores.out_of_distribution=$(D)/data/ood \
		train_stores=[$(D)/data/train] workers=$(WORKERS) episodes=$(STUDY_EPISODES)
	@echo "== $$(date +%T) demo 6/6: done. Data in $(D)/data, tokenizers in $(D)/tokenizers, the teacher's run in $(D)/joint \
	(loss plot $(D)/joint/loss.png); the report: $(D)/study/report.md"
	@sed -n 's/^\*\*Answer.\*\* //p' $(D)/study/report.md

$(D)/tokenizers/layout.json:
	$(BIN)/unified tokenizer fit --data $(D)/data/train --operators $(D)/data/operators --out $(D)/tokenizers \
		--image-steps 2000

$(D)/shards/meta.json: $(D)/tokenizers/layout.json
	$(BIN)/unified data tokenize --data $(D)/data/train --tokenizer $(D)/tokenizers --out $(D)/shards \
		--operators $(D)/data/operators --tasks policy_reason,policy,world,text

$(D)/joint/checkpoints/latest: $(D)/shards/meta.json
	$(BIN)/unified train --recipe recipes/joint.yaml --ranks 2 run_dir=$(D)/joint data=$(D)/shards

clean:
	rm -rf $(VENV) build *.egg-info runs

# Length generalisation on the operator data set: one small model per scratchpad (OPS_PADS: none, full, inductive) and seed
# (seed by seed, so that an interrupted run already compares the three), each trained through the DeepSpeed
# launcher by a curriculum of three stages, each from the export of the one before: 2-hop questions among the
# chain's own premises (OPS_STEPS1 steps), 2-4 hops among them (OPS_STEPS2), then 2-4 hops among 4 to 24 premises
# (OPS_STEPS3; the inductive scratchpad's with lookup drills, groups of its scratchpad). Tested on 2-12 hops with 24
# premises each, on questions no training set holds. Reads the demo's tokenizers; writes $(O)/summary.json,
# summary.md and accuracy_by_hops.png. Rerunning skips what is done and resumes a stage cut short.
O := $(D)/operators
OPS_SEEDS ?= 0 1 2
OPS_PADS ?= none full inductive
OPS_QUESTIONS ?= 200
OPS_OWN ?= 100000
OPS_MIXED ?= 30000
OPS_STEPS1 ?= 3000
OPS_STEPS2 ?= 1000
OPS_STEPS3 ?= 1500
OPS_LR ?= 0.001
OPS_WALK = --steps walk --phrasing greater-first
INDUCTIVE := model.inductive_scratchpad=true attention=sdpa
# One stage of scratchpad $(1) (a shell word), seed $(2), named $(3), on shards $(4), $(5) steps, from export $(6)
# (none for the first); done when its export exists (written whole or not at all).
ops_stage = test -d $(O)/$(1)/seed$(2)/$(3)_model || { $(BIN)/unified train --recipe recipes/operators.yaml \
		--ranks 2 $$(ls $(O)/$(1)/seed$(2)/$(3) 2>/dev/null | grep -q . && echo --resume) run_dir=$(O)/$(1)/seed$(2)/$(3) data=$(O)/$(1)/$(4) seed=$(2) steps=$(5) \
		save_every=250 optim.lr=$(OPS_LR) $(if $(6),init_from=$(O)/$(1)/seed$(2)/$(6)_model) \
		$$(test $(1) = inductive && echo $(INDUCTIVE)) && $(BIN)/unified export \
		--checkpoint $(O)/$(1)/seed$(2)/$(3) --out $(O)/$(1)/seed$(2)/$(3)_model; } || exit 1
operators: $(VENV)/.installed
	@test -f $(D)/tokenizers/layout.json || { echo "make operators reads the demo's data and tokenizers: run make demo first"; exit 1; }
	@grep -q '"<step>"' $(D)/tokenizers/layout.json || { echo "make operators: $(D)/tokenizers predate the <step> marker the inductive scratchpad needs; run make demo into a new directory (make demo DEMO_DIR=runs/demo2, then make operators DEMO_DIR=runs/demo2)"; exit 1; }
	$(BIN)/unified data operators --out $(O)/test --hops 2-12 --n $(OPS_QUESTIONS) --seed 1 --scratchpad full \
		--premises 24 $(OPS_WALK)
	for pad in $(OPS_PADS); do \
		$(BIN)/unified data operators --out $(O)/$$pad/own --hops 2-4 --scratchpad $$pad --n $(OPS_OWN) --seed 7 \
			$(OPS_WALK) --exclude $(O)/test || exit 1; \
		$(BIN)/unified data operators --out $(O)/$$pad/mixed --hops 2-4 --scratchpad $$pad --n $(OPS_MIXED) \
			--seed 7 $(OPS_WALK) --premises 24 --min-premises 4 $$(test $$pad = inductive && echo --drills) \
			--exclude $(O)/test || exit 1; \
		for set in h2,own,2 h24,own,2-4 mixed,mixed,2-4; do name=$${set%%,*}; hops=$${set##*,}; \
			data=$${set#*,}; data=$${data%,*}; \
			test -f $(O)/$$pad/$${name}_shards/meta.json || $(BIN)/unified data tokenize --data $(D)/data/train \
				--tokenizer $(D)/tokenizers --out $(O)/$$pad/$${name}_shards --operators $(O)/$$pad/$$data \
				--operator-hops $$hops --tasks text || exit 1; \
		done; \
	done
	for seed in $(OPS_SEEDS); do for pad in $(OPS_PADS); do \
		$(call ops_stage,$$pad,$$seed,stage1,h2_shards,$(OPS_STEPS1),); \
		$(call ops_stage,$$pad,$$seed,stage2,h24_shards,$(OPS_STEPS2),stage1); \
		$(call ops_stage,$$pad,$$seed,stage3,mixed_shards,$(OPS_STEPS3),stage2); \
		test -f $(O)/$$pad/seed$$seed.json || $(BIN)/unified eval operators --model $(O)/$$pad/seed$$seed/stage3_model \
			--data $(O)/test --n $(OPS_QUESTIONS) --json $(O)/$$pad/seed$$seed.json || exit 1; \
	done; done
	$(BIN)/unified eval operators-summary --runs $(O)

# DAgger after make demo: ROUNDS rounds of driving with the latest teacher (re-planning as the study does), the
# expert labelling every state it visits into the demo's store, and a fine-tune of the teacher on all of it.
ROUNDS ?= 2
dagger: $(VENV)/.installed
	@test -f $(D)/joint/checkpoints/latest || { echo "make dagger continues the demo's teacher: run make demo first"; exit 1; }
	previous=$(D)/joint; for r in $$(seq 1 $(ROUNDS)); do \
		$(BIN)/unified export --checkpoint $$previous --out $(D)/dagger/model_$$((r - 1)) --overwrite || exit 1; \
		$(BIN)/unified data dagger --model $(D)/dagger/model_$$((r - 1)) --out $(D)/data/train --episodes 100 \
			--round $$r --replan-every 5 --ensemble 0.5 --workers $(WORKERS) || exit 1; \
		test -f $(D)/dagger/shards_$$r/meta.json || $(BIN)/unified data tokenize --data $(D)/data/train \
			--tokenizer $(D)/tokenizers --out $(D)/dagger/shards_$$r --operators $(D)/data/operators \
			--tasks policy_reason,policy,world,text || exit 1; \
		test -f $(D)/dagger/run_$$r/checkpoints/latest || $(BIN)/unified train --recipe recipes/joint.yaml --ranks 2 \
			run_dir=$(D)/dagger/run_$$r data=$(D)/dagger/shards_$$r init_from=$(D)/dagger/model_$$((r - 1)) \
			steps=150 optim.lr=0.0005 optim.warmup_steps=10 || exit 1; \
		previous=$(D)/dagger/run_$$r; \
	done
	$(BIN)/unified export --checkpoint $(D)/dagger/run_$(ROUNDS) --out $(D)/dagger/model_$(ROUNDS) --overwrite
	$(BIN)/unified eval closed-loop --model $(D)/dagger/model_$(ROUNDS) --scenarios recipes/data/train.yaml \
		--episodes 20 --mode direct --replan-every 5 --ensemble 0.5 --workers $(WORKERS) --json $(D)/dagger/final.json

# What made the driver drive: one lever per row (recipes/ablation.yaml), each trained and driven (about 60 minutes here).
ablation: $(VENV)/.installed
	@test -f $(D)/tokenizers/layout.json || { echo "make ablation reads the demo's data and tokenizers: run make demo first"; exit 1; }
	$(BIN)/unified eval ablation --spec recipes/ablation.yaml --out $(D)/ablation

# Action bins against FAST tokens (recipes/action_tokens.yaml): the demo's teacher and the same recipe with FAST
# action tokens, driven action-only on the same seeds; the table in $(D)/action_tokens/ablation.md.
action-tokens: $(VENV)/.installed
	@test -f $(D)/joint/checkpoints/latest || { echo "make action-tokens compares with the demo's teacher: run make demo first"; exit 1; }
	$(BIN)/unified eval ablation --spec recipes/action_tokens.yaml --out $(D)/action_tokens
