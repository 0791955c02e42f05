# `make demo` and `make test` are the two commands of the README; both run `make setup`.
PY := .venv/bin/python

.PHONY: setup demo test unit lint bench bench-quick clean

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/procksm demo

lint: setup
	.venv/bin/ruff check procksm tests benchmarks
	.venv/bin/mypy

test: setup lint
	$(PY) -m pytest -q --durations=40 tests

# The unit tier alone: no root, no setup, seconds (tests not marked `root`, see
# tests/conftest.py). Needs only a venv with the project: pip install -e '.[test]'.
unit:
	$(PY) -m pytest -q -m "not root" tests

# procksm against the kernel's KSM: all workloads, scaling, goals, runtimes (~55 min, as
# root). `make bench-quick` (= benchmarks/suite.py --quick): the same runs at small sizes,
# one repetition, without the runtimes (~3 min; ARGS="--only runtimes" for them alone). `make bench ARGS="--only W1"` passes options to suite.py. The
# single-purpose scripts (scan_throughput.py, merge_vs_ksm.py, guard_overhead.py, ...)
# run on their own: benchmarks/README.md.
bench: setup
	$(PY) benchmarks/suite.py $(ARGS)

bench-quick: setup
	$(PY) benchmarks/suite.py --quick $(ARGS)

clean:
	rm -rf .venv build .pytest_cache .mypy_cache
