"""agem_fast benchmarks.

- `python -m bench.run` (or `python bench/run.py`, or `python -m bench`): the table of
  DESIGN.md section 7 per device, written as JSON + Markdown (+ PNG) to bench/results/.
- `pytest bench/`: pytest-benchmark microbenchmarks (the normal test suite does not
  collect them: testpaths = tests).
- `bench/gpu_check.sh`: all GPU validation and benchmarking in one call on a lent GPU.

The measuring code lives in `bench.harness`, the reports in `bench.report`.
"""
