# fastres: `make bench` runs the main job, `make test` runs the tests. Both set everything up
# first (virtual environment, the CUDA build of torch, the extension build) and are quick when
# nothing changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/python -m pip

TORCH_VERSION ?= 2.13.0
TORCHVISION_VERSION ?= 0.28.0
TRITON_VERSION ?= 3.7.1
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
# One stamp per venv: the pinned and the compat venv build their own extension
# (fastres/_C.cpython-3XX-*.so), side by side in the same checkout.
BUILD_STAMP := $(VENV)/.fastres-built
SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)
BENCH_DIR ?= benchmarks/results/local

.PHONY: setup build lint format test test-compat bench bench-peers bench-cpu-inference bench-bn-act bench-kernels gpu-check-dry-run info clean

setup: $(DEPS_STAMP)

$(DEPS_STAMP): requirements-dev.txt requirements-peers.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(TORCH_PIP_ENV) $(PIP) install --quiet torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION) \
		triton==$(TRITON_VERSION) -r requirements-dev.txt
	$(PY) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 'expected the CUDA build of torch, got ' + torch.__version__)"
	touch $@

build: $(BUILD_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $@

info: build
	$(PY) -m fastres

CXX_SOURCES = $(shell find csrc tests/cpp -name '*.h' -o -name '*.cpp' -o -name '*.cu')

# Lint, format and type checks (ruff, clang-format, mypy; settings in pyproject.toml and
# .clang-format); CI runs it before the tests. `make format` rewrites what lint would flag.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

test: build
	$(PY) -m fastres
	$(PY) -m pytest

# The same suite on the GPU machine's versions (Python 3.12, torch 2.11.0, torchvision 0.26.0,
# triton 3.6.0), in a venv of its own, so that what passes here also passes there.
COMPAT_VENV ?= .venv-compat
# The first Python 3.12 that runs: pyenv's own build (its shim on PATH may refuse to), then PATH.
COMPAT_PYTHON ?= $(shell for p in $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 \
	$$(command -v python3.12); do "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' \
	2>/dev/null && { echo "$$p"; break; }; done)
test-compat:
	@test -n "$(COMPAT_PYTHON)" || { echo "test-compat needs Python 3.12: put python3.12 on PATH or set COMPAT_PYTHON"; exit 1; }
	$(MAKE) test VENV=$(COMPAT_VENV) PYTHON=$(COMPAT_PYTHON) TORCH_VERSION=2.11.0 \
		TORCHVISION_VERSION=0.26.0 TRITON_VERSION=3.6.0

# The GPU check's plan and every phase that needs no GPU (CI runs it through the tests too).
gpu-check-dry-run: build
	PYTHON=$(PY) bash benchmarks/gpu_check.sh --dry-run $(BENCH_DIR)/gpu-check-dry-run

# The main job: ResNet-50 parity check, then training and inference throughput, memory and
# activation bytes against torchvision, on whatever device is here (BENCH_ARGS adds options,
# e.g. BENCH_ARGS="--dtype bf16 --batch-size 128").
BENCH_ARGS ?=
bench: build
	$(PY) -m fastres.bench --out $(BENCH_DIR) $(BENCH_ARGS)

# fastres's eval against ONNX Runtime and OpenVINO (the model exported inside the benchmark), at
# batch 1 and 16 on this CPU; PyTorch's configurations are timed too (training included).
PEERS_ARGS ?= --no-compile
bench-peers: build
	$(PY) -m fastres.bench --device cpu --peers --batch-size 1 --rounds 15 --out $(BENCH_DIR) \
		--csv $(BENCH_DIR)/resnet50_cpu_fp32_peers_batch1.csv $(PEERS_ARGS)
	$(PY) -m fastres.bench --device cpu --peers --batch-size 16 --rounds 7 --out $(BENCH_DIR) \
		--csv $(BENCH_DIR)/resnet50_cpu_fp32_peers_batch16.csv $(PEERS_ARGS)

# CPU inference in float32 and bfloat16 against ONNX Runtime and OpenVINO at its default
# precision (bfloat16 on a CPU with AMX), inference only: batch 16 and 1, 2 threads and 1.
bench-cpu-inference: build
	for setting in "16 2 7" "1 2 15" "16 1 7" "1 1 15"; do set -- $$setting; \
		$(PY) -m fastres.bench.cpu_inference --batch-size $$1 --threads $$2 --rounds $$3 \
			--out $(BENCH_DIR) $(CPU_INFERENCE_ARGS) || exit 1; done

# bn_act at every ResNet-50 BatchNorm shape against ATen's composition and torch.compile of it,
# training, interleaved: bfloat16 (the CPU target's dtype) and float32.
bench-bn-act: build
	for dtype in bf16 fp32; do \
		$(PY) -m fastres.bench.bn_act_shapes --dtype $$dtype --out $(BENCH_DIR) $(BN_ACT_ARGS) \
			|| exit 1; done

# Every fused op at every ResNet-50 layer shape against eager PyTorch and torch.compile.
bench-kernels: build
	mkdir -p $(BENCH_DIR)
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=min,median,rounds \
		--benchmark-max-time=0.5 --benchmark-json=$(BENCH_DIR)/bn_act.json -q
	$(PY) benchmarks/report.py $(BENCH_DIR)/bn_act.json

clean:
	rm -rf build $(VENV) $(COMPAT_VENV) fastres/_C*.so fastres/_build_info*.py *.egg-info
