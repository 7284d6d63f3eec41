"""Dispatch ``python -m uniperc.bench NAME [args]`` to ``uniperc.bench.NAME.main(args)``."""
import importlib
import sys

BENCHMARKS = ("backbone", "inference", "mixers", "dwconv", "dwconv_cpu", "data", "recipes", "gpu", "weather_memory")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        sys.exit(f"usage: python -m uniperc.bench {{{','.join(BENCHMARKS)}}} [options]")
    return importlib.import_module(f"uniperc.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # bad options or config: a clear message, no traceback
        sys.exit(f"error: {e}")
