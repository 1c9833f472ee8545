"""`python -m rice_mllm.export`: see `cli.main`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
