# Each target creates .venv and installs what it needs first; `make test` is what CI runs.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dtkernels-installed
CSRC   := $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: install test test-all bench demo demo-long ablate compare lint clean

install: $(STAMP)

# torch and torchvision come from this machine's disk (a CUDA build that also runs on the CPU); the package is
# installed without build isolation because its C++ extension is compiled against that torch.
$(STAMP): pyproject.toml setup.py $(CSRC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet "setuptools>=64" wheel ninja
	$(BIN)/pip install --quiet --no-build-isolation -e ".[dev,torchdistill,baselines]"
	# lightly without the Lightning and Hydra it declares but the baselines never import (pyproject.toml, baselines)
	$(BIN)/pip install --quiet --no-deps lightly==1.6.0
	$(BIN)/python -c "import lightly.loss, lightly.models.modules, lightly.models.utils, lightly.transforms"
	$(BIN)/python -c "import dtkernels, json; print(json.dumps(dtkernels.backends(), indent=1, default=str))"
	touch $@

# Both cores: one pytest-xdist worker each; a file's tests stay in one worker so its module fixtures (tiny trained
# teachers, converted checkpoints, Triton compiles) are built once. Workers keep torch's default threads: a test
# that runs two things at once needs two (most modules pin one thread with the one_thread fixture).
test: $(STAMP)
	$(BIN)/python -m pytest tests -q -n 2 --dist loadfile --durations=40

bench: $(STAMP)
	mkdir -p .benchmarks
	$(BIN)/python -m pytest benchmarks --benchmark-only --benchmark-json=.benchmarks/latest.json
	$(BIN)/python benchmarks/summarize.py .benchmarks/latest.json

# End to end on the built-in procedural dataset, no downloads: the shipped teacher, resnet18
# pretraining, export. Work is fixed in steps; the first seconds measure this machine and print the expected time.
demo: $(STAMP)
	$(BIN)/dreamteacher demo --out runs/demo

# The evidence: the same pipeline with larger budgets and longer runs (50 minutes on a 2-core CPU, docs/demo.md).
demo-long: $(STAMP)
	$(BIN)/dreamteacher demo --preset long --out runs/demo-long

ablate: $(STAMP)
	$(BIN)/dreamteacher ablate --preset long --pretrain-minutes 40 --out runs/ablate-long

# DreamTeacher beside SimCLR and DenseCL at the same steps and batch, the baselines' lr and temperature chosen on the
# validation split (docs/baselines.md, "Comparing with self-supervised baselines")
compare: $(STAMP)
	$(BIN)/dreamteacher compare --out runs/compare

lint: $(STAMP)
	$(BIN)/pip install --quiet ruff
	$(BIN)/ruff check dtkernels dreamteacher tests benchmarks

clean:
	rm -rf build dtkernels/_C*.so *.egg-info .pytest_cache
