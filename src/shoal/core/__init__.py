"""Pure decisions: no I/O, no asyncio, no clock (time is an argument), deterministic.

The same code runs in the master, in SimCluster and in unit tests.
"""
