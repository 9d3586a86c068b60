"""Shared by the tutorials: fast mode (the test suite sets ``FLEXIQ_TUTORIAL_FAST=1``) and
where outputs go (``FLEXIQ_TUTORIAL_OUT``, default ``tutorials/out``)."""

import os
from pathlib import Path

FAST = os.environ.get("FLEXIQ_TUTORIAL_FAST") == "1"
OUT = Path(os.environ.get("FLEXIQ_TUTORIAL_OUT", Path(__file__).resolve().parent / "out"))
OUT.mkdir(parents=True, exist_ok=True)


def pick(fast, full):
    """``fast`` under the test suite, ``full`` when run by hand."""
    return fast if FAST else full
