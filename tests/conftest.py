"""Fixtures shared by the tests; the helpers themselves live in helpers.py."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import Net

# DVCLive, run inside a git repository, makes it a DVC repository (`dvc init`): its test
# mode leaves the repository alone (folders given as absolute paths are kept)
os.environ.setdefault("DVCLIVE_TEST", "true")

# tests/scripts/ are programs the tests launch (under torchrun): run, never collected
collect_ignore_glob = ["scripts/*.py"]


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()
