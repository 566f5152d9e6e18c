"""Thin typer front end of diffit-pipe: parses arguments and calls `pipeline`."""
