"""Benchmarks: ``python -m uniperc.bench {backbone,mixers,dwconv,data,weather_memory,...}``."""
