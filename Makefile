# The two commands of the README, and the set-up they share. Everything a fresh machine needs is
# installed here: a virtual environment with the pinned dependencies, and the Debian package that
# carries the default data set (Fashion-MNIST).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export DVC_NO_ANALYTICS := 1
# dvc.yaml's commands call `loca-pipe`: the venv's scripts must be on PATH for the stages dvc runs.
export PATH := $(abspath $(BIN)):$(PATH)
export PYTHONHASHSEED := 0

.PHONY: setup repro repro-lm test bench clean

setup: $(STAMP) $(FMNIST)

# uv (a pinned wheel from PyPI, installed into the venv by pip) installs the pinned dependencies: measured on
# this 2-core machine with empty caches, 78 s for venv + uv + every dependency (bytecode included) against
# 4 min 45 s for pip alone (same versions; README "Time"). Should uv fail, pip installs the same pins. --compile-bytecode: pip writes
# the .pyc files at install time and uv does not; where PYTHONDONTWRITEBYTECODE is set (this machine sets it),
# every process would then compile torch from source again: `import torch` took 5.2 s instead of 2.1 s, in each
# of the pipeline's and the suite's hundreds of processes.
UV      := uv==0.13.8
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(UV)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e '.[test]' \
	  || { echo "uv failed; installing with pip instead" >&2; $(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'; }
	touch $(STAMP)

# The default data set ships as a Debian package (no download at run time).
$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; fi

## The main job: the whole DVC pipeline on the embedded default (Fashion-MNIST); ends with the report.
repro: setup
	$(BIN)/dvc repro
	@cat data/report/report.md

## The language-model pipeline (docs/language-models.md): its own DVC sub-repo (lm/.dvc), so its stages and
## metrics stay out of the image pipeline's `dvc status`, `dvc metrics show` and `dvc exp show`.
repro-lm: setup
	cd lm && $(abspath $(BIN))/dvc repro
	cat lm/report/table.md

## The test suite, on every core (pytest-xdist); one torch thread per worker so the workers do not oversubscribe.
test: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto

## Benchmarks: ratios measured in one run against a baseline in the same process.
bench: setup
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV)
