# `make demo` and `make test` are the two commands of the README; both run `make setup`.
PY := .venv/bin/python

.PHONY: setup demo test lint bench clean

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/procksm demo

lint: setup
	.venv/bin/ruff check procksm tests benchmarks
	.venv/bin/mypy

test: setup lint
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/scan_throughput.py
	$(PY) benchmarks/merge_vs_ksm.py

clean:
	rm -rf .venv build .pytest_cache .mypy_cache
