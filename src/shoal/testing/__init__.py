"""Test tools shipped with shoal: SimCluster (in memory, virtual clock) and live clusters
of real processes on loopback."""
