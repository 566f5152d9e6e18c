"""Fixtures of the encode-stage tests."""

import pytest
from typer.testing import CliRunner

from cli.main import app


@pytest.fixture
def cli():
    """Invoke the encode / pack / inspect commands in this process, through the `diffit-pipe` app (which turns
    pipeline errors into `error: ...` and their exit codes); an exception escaping a command is raised.
    (test_integrity.py has its own `cli`, which catches such an exception: a traceback is exit code 1 there.)"""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke
