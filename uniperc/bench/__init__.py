"""Benchmarks: ``python -m uniperc.bench {backbone,mixers,dwconv,data}``."""
