"""The rebalancer on simulated nodes: rounds and migrations from a skewed start.

    python bench/rebalance.py --nodes 100 --plot rebalance.png

A cluster of 8-core nodes: a fifth of them at 95% CPU, the rest at 10%, made of tasks of
0.4 to 1.6 cores. Each round runs the real core (`shoal.core.rebalance`, spread policy)
and applies its migrations, until the hottest node is within 10 points of the mean (loads
are taken as measured: the simulation has no noise to smooth). The least number of
migrations that reaches the same balance is found exactly by an ILP (OR-Tools CP-SAT) up to
`--exact-up-to` nodes; above, a lower bound: every hot node must lose at least the fewest of
its own tasks that bring it within the line (largest first), and each migration relieves one
node. Writes a PNG of every node's utilization, round by round.
Prints one JSON line last: nodes, rounds, migrations, min_migrations, min_exact,
over_min (migrations / min_migrations), max_minus_mean (at the end, in points).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from shoal.core.rebalance import Cluster, Movable, RebalancePolicy, applied, rebalance

CORES = 8.0
SIZES = (0.4, 0.8, 1.2, 1.6)
LINE = 0.10  # the goal: max - mean within 10 points


def skewed(nodes: int, seed: int) -> tuple[Cluster, list[Movable]]:
    rng = np.random.default_rng(seed)
    tasks: list[Movable] = []
    for row in range(nodes):
        goal = CORES * (0.95 if row < nodes // 5 else 0.10)
        load = 0.0
        while goal - load > 1e-9:
            size = min(float(rng.choice(SIZES)), round(goal - load, 6))
            tasks.append(Movable(f"t{row}.{len(tasks)}", row, size, np.array([size, 256.0])))
            load += size
    used = np.zeros(nodes)
    free = np.tile(np.array([CORES, 32768.0]), (nodes, 1))
    for t in tasks:
        used[t.row] += t.load
        free[t.row] -= t.ask
    return Cluster(np.full(nodes, CORES), used, free, np.ones(nodes, dtype=bool)), tasks


def gap(c: Cluster) -> float:
    return float(c.utilization.max() - c.used.sum() / c.cores.sum())


def lower_bound(c: Cluster, tasks: list[Movable]) -> int:
    """Each hot node sheds at least its fewest tasks (largest first) to reach the line."""
    limit = (c.used.sum() / c.cores.sum() + LINE) * CORES
    needed = 0
    for row in np.flatnonzero(c.used > limit + 1e-9):
        load = c.used[row]
        for size in sorted((t.load for t in tasks if t.row == row), reverse=True):
            if load <= limit + 1e-9:
                break
            load -= size
            needed += 1
    return needed


def exact_minimum(c: Cluster, tasks: list[Movable], seconds: float) -> tuple[int, bool]:
    """The fewest migrations that bring every node within the line (CP-SAT), and whether
    the solver proved it optimal in time (otherwise its best bound)."""
    from ortools.sat.python import cp_model  # only here: a heavy import, for small instances

    nodes = len(c.cores)
    scale = 100  # loads in hundredths of a core
    limit = int(math.floor((c.used.sum() / c.cores.sum() + LINE) * CORES * scale + 1e-6))
    model = cp_model.CpModel()
    place = {(i, n): model.NewBoolVar(f"x{i}_{n}") for i in range(len(tasks)) for n in range(nodes)}
    for i in range(len(tasks)):
        model.AddExactlyOne(place[(i, n)] for n in range(nodes))
    for n in range(nodes):
        model.Add(sum(int(round(t.load * scale)) * place[(i, n)] for i, t in enumerate(tasks)) <= limit)
    model.Minimize(sum(1 - place[(i, t.row)] for i, t in enumerate(tasks)))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = seconds
    solver.parameters.num_workers = 2
    status = solver.Solve(model)
    if status == cp_model.OPTIMAL:
        return int(solver.ObjectiveValue()), True
    return int(math.ceil(solver.BestObjectiveBound())), False


def plot(history: list[np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = np.array(history) * 100
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(
        range(len(levels)), levels, color="tab:blue", alpha=max(0.02, min(0.6, 20 / levels.shape[1])), lw=1
    )
    ax.plot(range(len(levels)), levels.mean(axis=1), color="black", lw=2, label="mean")
    ax.plot(range(len(levels)), levels.max(axis=1), color="tab:red", lw=2, label="hottest node")
    ax.set_xlabel("round")
    ax.set_ylabel("CPU utilization per node (%)")
    ax.set_xticks(range(len(levels)))
    ax.set_title(f"rebalancing {levels.shape[1]} nodes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--budget", type=int, help="migrations a round (default: half the nodes)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--exact-up-to", type=int, default=200, help="nodes up to which the ILP is solved")
    parser.add_argument("--plot", type=Path, default=Path("rebalance.png"))
    args = parser.parse_args()
    cluster, tasks = skewed(args.nodes, args.seed)
    policy = RebalancePolicy(budget=args.budget or max(1, args.nodes // 2))
    if args.nodes <= args.exact_up_to:
        minimum, exact = exact_minimum(cluster, tasks, seconds=60)
    else:
        minimum, exact = lower_bound(cluster, tasks), False
    history = [cluster.utilization]
    migrations = rounds = 0
    now = 0.0
    while gap(cluster) > LINE + 1e-9 and rounds < 10:
        moves = rebalance(cluster, tasks, policy, now)
        if not moves:
            break
        now += 60
        cluster, tasks = applied(cluster, tasks, moves, now)
        migrations += len(moves)
        rounds += 1
        history.append(cluster.utilization)
    plot(history, args.plot)
    print(f"wrote {args.plot}")
    print(
        json.dumps(
            {
                "nodes": args.nodes,
                "rounds": rounds,
                "migrations": migrations,
                "min_migrations": minimum,
                "min_exact": exact,
                "over_min": round(migrations / minimum, 3) if minimum else None,
                "max_minus_mean": round(gap(cluster) * 100, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
