# Style Factory. `make all-styles` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

CONFIG ?=
STYLES ?=
JOB_ARGS = $(if $(CONFIG),--config $(CONFIG)) $(foreach s,$(STYLES),--style $(s))

.PHONY: install all-styles curate train evaluate report test test-fast bench bench-gpu styles pretrain fetch-weights clean
install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

all-styles: $(STAMP)  ## curate -> train -> evaluate -> report, every style (CONFIG=run.yaml STYLES="a b" to narrow)
	$(PY) -m jobs.all_styles $(JOB_ARGS)

curate train evaluate report: $(STAMP)  ## one stage alone
	$(PY) -m jobs.$@ $(JOB_ARGS)

# pytest in TEST_WORKERS processes, a module's tests in one (tests/conftest.py: pytest_xdist_make_scheduler)
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS)
test: $(STAMP)  ## every test (CI runs exactly this)
	$(PYTEST) --durations=15

test-fast: $(STAMP)  ## the edit loop: the tests that start no Ray and take under ~2 s each (under 2 minutes)
	$(PYTEST) -m "not ray and not slow"

bench: $(STAMP)  ## speed, as ratios against references timed in the same run (python -m bench.run --help)
	$(PY) -m bench.run

bench-gpu: $(STAMP)  ## the prepared GPU check at SD 1.5 / SDXL size, <= 8 min on one H100/H200 (--dry-run: on CPU)
	$(PY) -m bench.gpu

styles: $(STAMP)  ## regenerate the example styles from the procedural toy world
	$(PY) scripts/make_example_styles.py --out styles

PRETRAIN_ARGS ?=
pretrain: $(STAMP)  ## retrain tiny-pretrained and the toy backbone into style_factory/assets (17 min on one H100, ~12 h on 2 CPU cores; PRETRAIN_ARGS=--cpu-hour: 79 min, kind not learnt)
	$(PY) scripts/train_tiny_pretrained.py $(PRETRAIN_ARGS)

fetch-weights: $(STAMP)  ## download the real Inception, CLIP and DINO weights, checked (MODELS_DIR=... to choose)
	$(PY) scripts/fetch_weights.py $(if $(MODELS_DIR),--models-dir $(MODELS_DIR))

compare: $(STAMP)  ## compare the same styles across run folders: RUNS="results/a results/b" (one protocol, else refused)
	$(PY) -m jobs.compare $(RUNS)

clean:  ## remove run outputs (keeps the venv)
	find results -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
