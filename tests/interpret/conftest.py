"""The Triton interpreter suite: TRITON_INTERPRET must be set before triton is first imported, so these
tests run in their own pytest process (`make test-interpret`), never together with the main suite."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.interpret)
