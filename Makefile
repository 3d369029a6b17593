# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the tests).
PY ?= python3
PIP ?= $(PY) -m pip
# CPU pins: torch 2.13.0 resolves to the local CPU wheel here (never a multi-GB CUDA build);
# Triton 3.8.0 runs its kernels on CPU tensors under TRITON_INTERPRET=1.
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.8.0

.PHONY: install demo test bench gpu-suite clean

install:
	$(PIP) install -q $(TORCH_PIN) $(TRITON_PIN)
	$(PIP) install -q -e ".[test,demo]"

demo: install
	$(PY) -m flowmatch_fast demo

test: install
	@echo "== tests, plain-torch backend (the oracle path), plus the CUDA build and sm_90 compile checks"
	$(PY) -m pytest tests -q -rs
	@echo "== the same parity suite through the Triton kernels, interpreted on CPU tensors"
	TRITON_INTERPRET=1 FLOWMATCH_FAST_BACKEND=triton $(PY) -m pytest tests -q -rs \
		--ignore=tests/test_demo.py --ignore=tests/test_triton_compile.py
	@if $(PY) -c "import flowmatch_fast._cuda_euler" 2>/dev/null; then \
		echo "== the same suite through the CUDA kernels, emulated on the host (CPU tensors)"; \
		FLOWMATCH_FAST_BACKEND=cuda FLOWMATCH_FAST_CUDA_EMULATE=1 $(PY) -m pytest tests -q -rs \
			--ignore=tests/test_demo.py --ignore=tests/test_triton_compile.py \
			--ignore=tests/test_cuda_binary.py \
			--deselect tests/test_api.py::test_unavailable_backend_is_an_error_with_the_fix \
			--deselect tests/test_backends.py::test_real_reasons_on_this_machine; \
	else echo "== no CUDA extension built (no nvcc): the emulated CUDA pass is skipped"; fi
	@echo "== benchmarks run once each (timings: make bench)"
	$(PY) -m pytest bench -q --benchmark-disable

bench: install
	$(PY) -m pytest bench

gpu-suite:
	bash bench/gpu_suite.sh

clean:
	rm -rf build *.egg-info flowmatch_fast/*.so .pytest_cache .benchmarks
