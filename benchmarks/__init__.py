"""Benchmarks: each `bench_*.py` module has a `main()` that prints ratios measured in one run against a
baseline in the same process (never timed assertions in tests; this machine is shared and noisy)."""
