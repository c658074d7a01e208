"""Worst relative difference per backend pair and dtype over the conformance suite's cases.

    python benchmarks/conformance_report.py      # runs tests/conformance (about a minute on CPU)

Runs the suite in-process and prints the table the suite records (the same numbers the
suite's module docstring quotes).
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    code = pytest.main([str(ROOT / "tests" / "conformance"), "-q", "-s", "-p", "no:cacheprovider",
                        "-W", "ignore::UserWarning"])
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
