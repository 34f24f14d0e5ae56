"""Small task programs the live tests and benchmarks run on real agents."""

from __future__ import annotations

# Counts from where its saved state says; told to stop, it takes a moment, then saves the
# count: a task that checkpoints, to show a move kept its state.
COUNTER = [
    "python3",
    "-c",
    "import os, pathlib, signal, sys, time\n"
    "state = pathlib.Path(os.environ['SHOAL_CHECKPOINT_DIR']) / 'count'\n"
    "n = int(state.read_text()) if state.exists() else 0\n"
    "def save(*_):\n    time.sleep(0.3)\n    state.write_text(str(n))\n    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, save)\n"
    "while True:\n    n += 1\n    print(n, flush=True)\n    time.sleep(0.05)\n",
]
