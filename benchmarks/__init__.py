"""Speed and correctness measurements of the `llama` package, run as modules from the
checkout's root: `python -m benchmarks.bench --help` (see docs/performance.md)."""
