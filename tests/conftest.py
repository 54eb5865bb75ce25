"""Fixtures shared by the tests; the helpers themselves live in helpers.py."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from helpers import Net

# A shell starts background jobs with Ctrl-C ignored (SIG_IGN), and Python then keeps it
# so; ft.fit rightly leaves a program's own SIGINT setting alone. The tests of Ctrl-C need
# Python's usual handler, as in a program started from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# DVCLive, run inside a git repository, makes it a DVC repository (`dvc init`): its test
# mode leaves the repository alone (folders given as absolute paths are kept)
os.environ.setdefault("DVCLIVE_TEST", "true")

# tests/scripts/ are programs the tests launch (under torchrun): run, never collected
collect_ignore_glob = ["scripts/*.py"]


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()
