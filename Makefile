# Quickstart: `make demo` and `make test`. Both create .venv from the pinned files when needed.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Exact pins on Python 3.11; plain ranges elsewhere (jax >= 0.11 needs Python >= 3.12).
CONSTRAINTS := $(shell $(PY) -c 'import sys; print("-c constraints-py311.txt" if sys.version_info[:2]==(3,11) else "")')
WORKDIR ?= runs/demo
PYTEST_ARGS ?= -n 2

.PHONY: setup demo test lock clean bench

setup: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt constraints-py311.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(CONSTRAINTS) -r requirements.txt -r requirements-test.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) scripts/demo.py --workdir $(WORKDIR)

# pytest exits 5 when nothing was collected: that is a failure here, not a pass.
test: $(STAMP)
	$(VPY) -m pytest -q $(PYTEST_ARGS) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lock: $(STAMP)
	$(VPY) -m pip freeze | sed 's/+cpu$$//' > constraints-py311.txt

clean:
	rm -rf $(VENV) runs
