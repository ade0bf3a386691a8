"""``python -m dreamteacher``."""

from .cli import main

if __name__ == "__main__":  # not when a spawned worker process (evaluate.parallel_map) re-imports the main module
    raise SystemExit(main())
