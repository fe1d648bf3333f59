"""Command-line benchmarks: `python -m benchmarks.<op>` prints a table (and can write JSON and
a PNG plot). They are commands, not tests: CI checks correctness, these report speed."""
