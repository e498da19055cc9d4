"""Benchmarks: deltavol and its peers side by side in one run, reported as ratios."""
