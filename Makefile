# make demo: install, then the main job on the bundled sample track with the tiny model (CPU, ~2 min).
# make test: install, then ruff and the test suite but the KD backend's own tests (marked kd), which make test-jax-env runs
# in the JAX environment (Python 3.12, no torch, .venv-jax); make test-slurm: the SLURM tests on a two-node cluster
# it starts. .ci/run runs all three.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Local wheel folders that pip is configured with (this is where a CPU torch may lie); elsewhere the CPU
# build comes from PyTorch's own index.
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
WHEELS := $(if $(FIND_LINKS),--find-links $(FIND_LINKS),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)

# The JAX environment's Python 3.12: python3.12 on PATH, else pyenv's (its shim answers only where 3.12 is selected).
JAX_PYTHON ?= $(shell for p in python3.12 $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12; do \
	$$p -c '' 2>/dev/null && { echo $$p; break; }; done)
JAX_VENV := .venv-jax

TRACK ?=
DATA_DIR ?= data

.PHONY: install install-jax demo demo-continual test test-slurm test-jax-env download format stages lock clean

install: $(VENV)/.installed

# The lock pins every package (see requirements/lock.txt); --no-deps installs exactly that set, fast.
$(VENV)/.installed: pyproject.toml requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv==0.13.9
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps $(WHEELS) -r requirements/lock.txt
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -e .
	touch $@

# The KD backend alone on the current JAX stack (requirements/lock-jax.txt), with the CPU jax; the GPU and TPU
# builds are environment-jax-gpu.yml and environment-jax-tpu.yml.
install-jax: $(JAX_VENV)/.installed

$(JAX_VENV)/.installed: pyproject.toml requirements/lock-jax.txt
	@test -n "$(JAX_PYTHON)" || { echo "make install-jax: no Python 3.12 found; set JAX_PYTHON=/path/to/python3.12" >&2; exit 2; }
	test -x $(JAX_VENV)/bin/python || $(JAX_PYTHON) -m venv $(JAX_VENV)
	$(JAX_VENV)/bin/python -m pip install -q --disable-pip-version-check uv==0.13.9
	$(JAX_VENV)/bin/uv pip install -q --python $(JAX_VENV)/bin/python --no-deps -r requirements/lock-jax.txt
	$(JAX_VENV)/bin/uv pip install -q --python $(JAX_VENV)/bin/python --no-deps -e .
	touch $@

demo: install
	rm -rf outputs/cbe/demo
	$(PY) main.py logging.run_name=demo

# Continual learning: the sample track in 3 stages; prints the accuracy matrix and its summary at the end, with the
# bundled lm-eval task's scores after every stage (general ability).
demo-continual: install
	rm -rf outputs/cbe/demo-continual
	$(PY) main.py task=sample_stages logging.run_name=demo-continual 'continual.lm_eval_tasks=[cbe_general_mc]'

# ruff first (seconds): lint and format are part of the tests.
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -m "not slurm and not kd" --durations=20

# The tests marked kd: the KD backend on its own, without torch, in the environment KD runs in (the HF<->KD parity tests,
# which train, evaluate, save and load KD on the 3.11 stack, need both backends and run in make test).
test-jax-env: install-jax
	$(JAX_VENV)/bin/python -m pytest -q -m "kd and not slurm" --durations=10

# Installs Debian's slurmctld/slurmd/munge if missing (needs root or sudo), starts them, runs the tests, stops them.
test-slurm: install
	tests/slurm/cluster.sh $(PY) -m pytest -q -m slurm tests/slurm

# make download [TRACK=news|geminon] [REVISION=main]: every track in data/download.yaml when TRACK is not
# given, at its pinned revision unless REVISION names another.
download: install
	$(VENV)/bin/cbe download $(if $(TRACK),--track $(TRACK)) $(if $(REVISION),--revision $(REVISION)) --data-dir $(DATA_DIR)

# make format TRACK=news: render the raw news articles as Title/Date/Article text as the benchmark does
# (dates as "Sep 01 (2025-09-01 00:00:00 UTC)", untitled articles dropped, each article stripped and ending
# in a newline), train and val in place.
format: install
	test "$(TRACK)" = news || { echo "make format: only TRACK=news needs formatting" >&2; exit 2; }
	$(VENV)/bin/cbe format-news --input $(DATA_DIR)/news/train.jsonl --output $(DATA_DIR)/news/train.jsonl --overwrite
	$(VENV)/bin/cbe format-news --input $(DATA_DIR)/news/val.jsonl --output $(DATA_DIR)/news/val.jsonl --overwrite

# make stages TRACK=news BY=week|month, or TRACK=geminon STAGES=3: cut the raw download (before `make format`)
# into stages, data/<task>/, and write conf/task/<task>.yaml (task=news_weekly, news_monthly, geminon_3stages).
stages: install
	$(VENV)/bin/cbe make-stages --track $(TRACK) $(if $(BY),--by $(BY)) $(if $(STAGES),--stages $(STAGES)) --data-dir $(DATA_DIR)

# Re-resolve the locks after changing pyproject.toml's dependencies (pins stay near the verified set): the combined
# Python 3.11 environment's, and the JAX environments' (Python 3.12; CPU for make test-jax-env, CUDA, TPU).
JAX_LOCK = $(VENV)/bin/uv pip compile pyproject.toml --extra wandb --extra judge --extra slurm --extra dev \
	--overrides requirements/overrides.txt --python-version 3.12 --no-annotate --no-header
lock:
	$(VENV)/bin/uv pip compile pyproject.toml --extra hf --extra kd --extra wandb --extra judge --extra slurm --extra dev \
		--overrides requirements/overrides.txt --python-version 3.11 $(WHEELS) --no-annotate --no-header \
		-o requirements/lock.txt
	$(JAX_LOCK) --extra kd -o requirements/lock-jax.txt
	$(JAX_LOCK) --extra kd-gpu --python-platform x86_64-manylinux_2_28 -o requirements/lock-jax-gpu.txt
	$(JAX_LOCK) --extra kd-tpu --python-platform x86_64-manylinux_2_31 -o requirements/lock-jax-tpu.txt

clean:
	rm -rf $(VENV) $(JAX_VENV) outputs multirun
