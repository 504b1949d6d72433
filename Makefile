# Set-up and entry points. Every target creates and uses ./.venv.
#
# torch comes first, pinned, from TORCH_INDEX: by default the PyTorch CPU index, which gives
# torch 2.13.0+cpu and no CUDA packages. Where that index cannot be reached (a probe of
# TORCH_PROBE_TIMEOUT s), or installing from it fails, torch==2.13.0 is installed from pip's own
# configuration instead (its index and any find-links), and a line says so: on a plain PyPI for
# Linux x86_64 that is the CUDA build, several GB. `make venv TORCH_INDEX=` skips the CPU index.
# Both builds run the tests on a CPU.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PROBE_TIMEOUT ?= 10
PIP := $(BIN)/python -m pip

.PHONY: venv demo test benchmark nist-report clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first (see the top of this file); skipped when the venv already has this version
	@if $(BIN)/python -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null; then \
	  echo "torch $(TORCH_VERSION) already installed"; \
	elif [ -z "$(TORCH_INDEX)" ]; then \
	  echo "torch==$(TORCH_VERSION) from pip's configured index (TORCH_INDEX is empty)"; \
	  $(PIP) install -q torch==$(TORCH_VERSION); \
	elif $(BIN)/python -c "import urllib.request as u; u.urlopen('$(TORCH_INDEX)/torch/', timeout=$(TORCH_PROBE_TIMEOUT))" 2>/dev/null; then \
	  echo "torch==$(TORCH_VERSION) from $(TORCH_INDEX)"; \
	  $(PIP) install -q torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX) || { \
	    echo "installing torch==$(TORCH_VERSION) from $(TORCH_INDEX) failed: falling back to pip's configured index (on a plain PyPI: the CUDA build)"; \
	    $(PIP) install -q torch==$(TORCH_VERSION); }; \
	else \
	  echo "$(TORCH_INDEX) cannot be reached: torch==$(TORCH_VERSION) from pip's configured index and find-links instead (on a plain PyPI: the CUDA build)"; \
	  $(PIP) install -q torch==$(TORCH_VERSION); \
	fi
	$(PIP) install -q -e ".[test,plots]"
	@$(BIN)/python -c "import torch; print('installed: torch', torch.__version__, '(CUDA ' + torch.version.cuda + ' build)' if torch.version.cuda else '(CPU build)')"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

benchmark: $(STAMP)
	$(BIN)/python scripts/benchmark_fit.py

nist-report: $(STAMP)
	$(BIN)/python scripts/nist_real_report.py --out docs/nist_real_scans.md

clean:
	rm -rf $(VENV) out
