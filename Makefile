# Two entry points: `make repro` runs the pipeline on the embedded default, `make test` runs the tests.
# Both create .venv (Python 3.11) and install requirements.txt on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: repro test test-paper lint bench seeds seeds-hsg ceiling sheet clean-artifacts detectron2

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	# bytecode once, on both cores (~40 s): with PYTHONDONTWRITEBYTECODE set, as on these machines, every stage
	# process would otherwise recompile torch from source (import torch + torchvision 17 s instead of 4.5 s).
	# Best effort: a file in a wheel's test suite that needs a newer Python fails to compile and is not imported.
	$(PY) -m compileall -q -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') >/dev/null || true
	touch $(STAMP)

# optional: detectron2 for distill.backend: detectron2 (the paper's Mask R-CNN), from ../shared/wheels when a wheel
# there matches this venv's Python and torch; otherwise prints the build-from-source command
detectron2: $(STAMP)
	$(PY) scripts/install_detectron2.py

repro: $(STAMP)
	dvc repro
	@cat artifacts/metrics/table.md

# one pytest-xdist worker per core, whole files per worker (the micro repo's tests share a module fixture), and
# one thread each so that the workers do not fight over the cores; TEST_WORKERS=0 for one process
TEST_WORKERS ?= auto
test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile; status=$$?; \
	if [ $$status -eq 5 ]; then echo 'pytest collected no tests' >&2; fi; exit $$status

# the pipeline at the paper's geometry on a handful of images (CPU, ~10 min): runs, and its peak memory
test-paper: $(STAMP)
	$(PY) -m pytest -q -m paper_scale

# seeded runs (K-means, Mask R-CNN, DeepLab and evaluate seeds 0 1 2; seed 0 is params.yaml's, i.e. the workspace
# run), one DVC experiment each, evaluate_hsg included; writes artifacts/metrics/seeds.json and seeds.md (mean ± std).
# SEEDS="0 1 2 3 4" for more.
SEEDS ?= 0 1 2
seeds: $(STAMP)
	$(PY) scripts/seeds.py run --seeds $(SEEDS) --hsg
	$(PY) scripts/seeds.py collect --seeds $(SEEDS)

# the same seeds with Mask R-CNN and DeepLab starting from the HSG ResNet (checkpoints/hsg_tiny.pth) instead of
# from scratch: seeds_hsg.json / .md
seeds-hsg: $(STAMP)
	$(PY) scripts/seeds.py run --seeds $(SEEDS) --hsg --name hsg --set distill.backbone_weights=hsg \
		--set deeplab.backbone_weights=hsg
	$(PY) scripts/seeds.py collect --seeds $(SEEDS) --name hsg

# README's picture: four random validation images at every stage, from the workspace run
sheet: $(STAMP)
	mkdir -p docs && $(PY) -m unseg inspect grid --n 4 --sort random -o docs/contact_sheet.png

# the supervised ceiling once, in the workspace (same networks and budget, ground-truth labels)
ceiling: $(STAMP)
	dvc repro ceiling/dvc.yaml
	@cat artifacts/metrics/ceiling.json

lint: $(STAMP)
	$(VENV)/bin/ruff check unseg stages tests benchmarks scripts
	$(VENV)/bin/ruff format --check unseg stages tests benchmarks scripts

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean-artifacts:
	rm -rf artifacts/* data/prepared
