"""shoal: turn a set of Linux machines into one pool.

`shoal.core` holds the pure decisions, `shoal.master` and `shoal.agent` their state
machines under thin I/O shells, `shoal.client` the SDK the CLI is built on.
"""

__version__ = "0.1.0"
