"""Drivers for tests, the demo and the benchmarks; `scripts.bench` is a package run with
`python -m scripts.bench`."""
