"""`python -m rice_mllm.data check FILE ...`: validate conversation data before training (see doctor.py);
`python -m rice_mllm.data to-shards FILE --out DIR`: write it as Parquet shards with embedded images."""

from __future__ import annotations

import argparse
import sys

from rice_mllm.data import conversation_shards, doctor


def main(argv: list[str] | None = None) -> int:
    """Parse argv, run the sub-command, return the exit code (non-zero when problems were found)."""
    parser = argparse.ArgumentParser(prog="python -m rice_mllm.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    doctor.add_check_arguments(
        commands.add_parser("check", help="open every image, render every sample, report bad records by index")
    )
    conversation_shards.add_to_shards_arguments(
        commands.add_parser("to-shards", help="a LLaVA file + its images -> Parquet shards with the image bytes")
    )
    args = parser.parse_args(argv)
    return doctor.run_check(args) if args.command == "check" else conversation_shards.run_to_shards(args)


if __name__ == "__main__":
    sys.exit(main())
