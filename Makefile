# vmfx: one command sets everything up and runs the main job (`make demo`), one sets everything up
# and runs the tests (`make test`). Both create the local virtual environment .venv on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vmfx-installed
# Upstream mamba-ssm is an optional extra, built without CUDA, for the adapter tests and the scan
# benchmark; --no-deps keeps it from pulling ~0.6 GB of GPU-only packages.
MAMBA_SSM := mamba-ssm==2.3.2.post1
# MambaVision (NVlabs) is an optional extra too, for its adapter and compile tests; --no-deps so it
# cannot pull torch or a CUDA mamba-ssm (it needs timm, einops and the mamba-ssm above).
MAMBAVISION := mambavision==1.2.0

.PHONY: setup demo test bench-scan clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt
	MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE \
		$(BIN)/pip install -q --no-build-isolation --no-deps $(MAMBA_SSM)
	$(BIN)/pip install -q --no-deps $(MAMBAVISION)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# The main job on the bundled default: quantize the proxy Vim (trained here on real digits) with
# PTQ4VM and, for reference, the min-max baseline, at W4A4; print FP vs quantized top-1, agreement
# with the float model, KL, size on disk and ms per image (see the README).
demo: $(STAMP)
	$(BIN)/vmfx eval --config minmax-w4a4 --config ptq4vm-w4a4

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench-scan: $(STAMP)
	$(BIN)/python benchmarks/scan.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
