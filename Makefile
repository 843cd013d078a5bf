# Quickstart: `make demo` and `make test`. Both create .venv from the pinned files when needed.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# Exact pins on Python 3.11; plain ranges elsewhere (jax >= 0.11 needs Python >= 3.12).
CONSTRAINTS := $(shell $(PY) -c 'import sys; print("-c constraints-py311.txt" if sys.version_info[:2]==(3,11) else "")')
WORKDIR ?= runs/demo
PYTEST_ARGS ?= -n 2
# glibc's malloc asks for transparent huge pages (where the kernel's THP mode is `madvise`): XLA CPU's step
# buffers then fault in 2 MiB at a time, not 4 KiB (the demo's stage-2 step: 55k page faults -> 0.6k, 263 ->
# 206 ms; docs/training.md "Optimiser, numerics, sharding"). Set GLIBC_TUNABLES yourself to override; glibc < 2.35 ignores it.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: setup demo demo-more test lock clean bench

setup: $(STAMP)

# The runtime set-up (what `make demo` needs) and the test-only packages (torch, transformers, pytest, ...)
# on top for `make test`: a demo does not wait ~30 s for torch.
$(STAMP): requirements.txt constraints-py311.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(CONSTRAINTS) -r requirements.txt
	touch $(STAMP)

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(VPY) -m pip install -q $(CONSTRAINTS) -r requirements.txt -r requirements-test.txt
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(VPY) scripts/demo.py --workdir $(WORKDIR)

# The sibling methods' stages and rows (MQT, MoD, visual region) in the same workdir (docs/demo.md).
demo-more: $(STAMP)
	$(VPY) scripts/demo_more.py --workdir $(WORKDIR)

# pytest exits 5 when nothing was collected: that is a failure here, not a pass.
test: $(TEST_STAMP)
	$(VPY) -m pytest -q $(PYTEST_ARGS) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The benchmarks quoted in docs/ (not tests; about two hours on 2 CPU cores). JSON files go to
# $(BENCH_OUT); `make bench BENCH_OUT=benchmarks/results` refreshes the committed ones.
BENCH_OUT ?= runs/bench
bench: $(TEST_STAMP)
	mkdir -p $(BENCH_OUT)
	$(VPY) benchmarks/xla_cost.py --json $(BENCH_OUT)/xla_cost.json
	$(VPY) benchmarks/prefill_decode.py --batches 8 --new_tokens 4,36 --runs 3 --json $(BENCH_OUT)/prefill_decode_b8.json
	$(VPY) benchmarks/prefill_decode.py --batches 1 --new_tokens 8,40 --runs 3 --json $(BENCH_OUT)/prefill_decode_b1.json
	$(VPY) benchmarks/prefill_decode.py --batches 1 --new_tokens 64,512 --runs 0 --no_flops --text_keep_rate 0.5 \
	    --json $(BENCH_OUT)/kv_bytes_b1.json
	$(VPY) benchmarks/hf_reference.py --batches 8 --new_tokens 4,36 --runs 5 --json $(BENCH_OUT)/hf_reference_b8.json
	$(VPY) benchmarks/hf_reference.py --batches 8 --new_tokens 4,36 --runs 5 --json $(BENCH_OUT)/hf_reference_b8_run2.json
	$(VPY) benchmarks/hf_reference.py --batches 1 --new_tokens 8,72 --runs 5 --json $(BENCH_OUT)/hf_reference_b1.json
	$(VPY) benchmarks/decode_step.py --batch 1 --capacities 128,768,1536 --json $(BENCH_OUT)/decode_step_b1.json
	$(VPY) benchmarks/decode_step.py --batch 8 --capacities 128,768,1536 --runs 3 --json $(BENCH_OUT)/decode_step_b8.json
	$(VPY) benchmarks/decode_step.py --batch 1 --capacities 128,768 --blocks 8 --json $(BENCH_OUT)/decode_step_b1_blocks8.json
	$(VPY) benchmarks/cpu_kernels.py --json $(BENCH_OUT)/cpu_kernels.json
	$(VPY) benchmarks/train_step.py --batches 1 --runs 3 --no_memory --json $(BENCH_OUT)/train_step_b1.json
	$(VPY) benchmarks/mqt_prefill.py --runs 5 --json $(BENCH_OUT)/mqt_prefill.json
	$(VPY) benchmarks/prune_prefill.py --size bench --runs 7 --json $(BENCH_OUT)/prune_prefill.json
	$(VPY) benchmarks/region_step.py --size bench --steps 5 --json $(BENCH_OUT)/region_step_bench_timed.json
	$(VPY) benchmarks/mod_step.py --size bench --frames 8 --image_size 168 --runs 3 --json $(BENCH_OUT)/mod_step_bench_8x144.json
	$(VPY) benchmarks/serve_throughput.py --size bench --requests 16 --clients 8 --max_tokens 8 --repeats 3 \
	    --json $(BENCH_OUT)/serve_throughput_bench.json
	$(VPY) benchmarks/summarize.py $(BENCH_OUT)/*.json

lock: $(TEST_STAMP)
	$(VPY) -m pip freeze | sed 's/+cpu$$//' > constraints-py311.txt

clean:
	rm -rf $(VENV) runs
