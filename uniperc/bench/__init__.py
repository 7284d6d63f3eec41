"""Benchmarks: ``python -m uniperc.bench {backbone,inference,mixers,dwconv,data,weather_memory,...}``."""
