"""Fixtures shared by the tests; the helpers themselves live in helpers.py."""

from __future__ import annotations

import pytest
import torch
from helpers import Net

# tests/scripts/ are programs the tests launch (under torchrun): run, never collected
collect_ignore_glob = ["scripts/*.py"]


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()
