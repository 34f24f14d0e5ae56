"""A short chaos run on network-namespace hosts (`shoal.testing.chaos`): three masters on
three etcd members, agents on hosts of their own, a steady workload, and three leader
kills, an etcd member killed, the leader cut from etcd and an agent's host isolated for
less than the heartbeat timeout. Nothing acknowledged may be lost, no task may run twice or
more often than its restart policy allows, every leader kill is followed by new work
accepted and started, the framework hears every task it launched end, and the registry
gives the service's running task."""

from __future__ import annotations

import pytest

from shoal.testing.chaos import (
    CUT_LEADER_ETCD,
    ISOLATE_AGENT,
    KILL_ETCD,
    KILL_LEADER,
    ChaosConfig,
    run_chaos,
)
from shoal.testing.hosts import clean_leftovers, require_netns

PLAN = (KILL_LEADER, KILL_ETCD, KILL_LEADER, CUT_LEADER_ETCD, ISOLATE_AGENT, KILL_LEADER)


@pytest.mark.timeout(240)
def test_a_short_chaos_run_loses_nothing_and_runs_nothing_twice(tmp_path) -> None:
    require_netns()
    clean_leftovers()
    result = run_chaos(ChaosConfig(seed=3, plan=PLAN, long_jobs=1, end_timeout=60), tmp_path)
    evidence = "\n".join(result.problems)
    assert result.faults == {KILL_LEADER: 3, KILL_ETCD: 1, CUT_LEADER_ETCD: 1, ISOLATE_AGENT: 1}
    assert result.acknowledged > 0 and result.complete > 0
    assert (result.lost, result.duplicates, result.repeated_runs) == (0, 0, 0), evidence
    assert result.over_restarted == 0, evidence
    assert result.unended_runs == 0, evidence
    assert result.framework_tasks > 0 and result.framework_unended == 0, evidence
    assert result.service_wrong == 0, evidence
    assert result.invariants == ""
    assert len(result.failovers) == 3
    assert all(f.submit_s is not None and f.launch_s is not None for f in result.failovers), result.failovers
