"""Benchmarks that print ratios measured in the same run (issue 13); results in docs/benchmarks.md."""
