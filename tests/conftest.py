"""Shared fixtures: the devices every op test runs on (CPU always, CUDA when present). Tolerances live in
tests/helpers.py, one table for every test."""

import pytest

from tests.helpers import DEVICES


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
