"""Thin CLI: `python scripts/data_doctor.py FILE ... [flags]` == `python -m rice_mllm.data check FILE ...`."""

import sys

from rice_mllm.data.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["check", *sys.argv[1:]]))
