"""Stages of diffit-pipe (encode / pack, train, evaluate), their data formats and I/O.

`pipeline` builds on the pure model library `diffit`; it never imports `cli`.
"""

__version__ = "0.1.0"
