"""`python -m rice_mllm.data check FILE ...`: validate conversation data before training (see doctor.py)."""

from __future__ import annotations

import argparse
import sys

from rice_mllm.data import doctor


def main(argv: list[str] | None = None) -> int:
    """Parse argv, run the sub-command, return the exit code (non-zero when problems were found)."""
    parser = argparse.ArgumentParser(prog="python -m rice_mllm.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    doctor.add_check_arguments(
        commands.add_parser("check", help="open every image, render every sample, report bad records by index")
    )
    args = parser.parse_args(argv)
    return doctor.run_check(args)


if __name__ == "__main__":
    sys.exit(main())
