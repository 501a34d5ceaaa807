# fastres: `make bench` runs the main job, `make test` runs the tests. Both set everything up
# first (virtual environment, the CUDA build of torch, the extension build) and are quick when
# nothing changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/python -m pip

TORCH_VERSION ?= 2.13.0
TORCHVISION_VERSION ?= 0.28.0
# Some package mirrors serve a CPU-only torch first, which cannot import torchvision or link a
# CUDA extension. The CUDA build runs fine without a GPU, so install it from the plain index,
# ignoring local pip configuration (certificate settings in the environment are kept).
TORCH_PIP_ENV ?= env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null

# auto: build the CUDA kernels when a CUDA torch and nvcc are found (1: insist; 0: skip).
FASTRES_CUDA ?= auto
# CI compiles the CUDA sources for one architecture; users get setup.py's default list.
ifeq ($(CI),true)
FASTRES_CUDA_ARCHS ?= 9.0
endif
MAX_JOBS ?= 2
export FASTRES_CUDA FASTRES_CUDA_ARCHS MAX_JOBS

DEPS_STAMP := $(VENV)/.fastres-deps-torch-$(TORCH_VERSION)
BUILD_STAMP := build/.fastres-built
SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)
BENCH_DIR ?= benchmarks/results/local

.PHONY: setup build test bench bench-kernels info clean

setup: $(DEPS_STAMP)

$(DEPS_STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(TORCH_PIP_ENV) $(PIP) install --quiet torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION) -r requirements-dev.txt
	$(PY) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 'expected the CUDA build of torch, got ' + torch.__version__)"
	touch $@

build: $(BUILD_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

info: build
	$(PY) -m fastres.info

test: build
	$(PY) -m fastres.info
	$(PY) -m pytest

# The main job: ResNet-50 parity check, then training and inference throughput, memory and
# activation bytes against torchvision, on whatever device is here (BENCH_ARGS adds options,
# e.g. BENCH_ARGS="--dtype bf16 --batch-size 128").
BENCH_ARGS ?=
bench: build
	$(PY) -m fastres.bench --out $(BENCH_DIR) $(BENCH_ARGS)

# Every fused op at every ResNet-50 layer shape against eager PyTorch and torch.compile.
bench-kernels: build
	mkdir -p $(BENCH_DIR)
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=min,median,rounds \
		--benchmark-max-time=0.5 --benchmark-json=$(BENCH_DIR)/bn_act.json -q
	$(PY) benchmarks/report.py $(BENCH_DIR)/bn_act.json

clean:
	rm -rf build $(VENV) fastres/_C*.so fastres/_build_info.py *.egg-info
