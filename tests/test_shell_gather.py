"""Gathering and node groups of the parallel shell: pure, against ClusterShell's own folding."""

from __future__ import annotations

from pathlib import Path

import pytest
from ClusterShell.NodeSet import NodeSet
from ClusterShell.NodeUtils import GroupResolverConfig
from hypothesis import given
from hypothesis import strategies as st

from shoal.errors import SpecError
from shoal.model import NodeInfo, NodeStatus, Resources, Usage
from shoal.shell.gather import TIMED_OUT_STATUS, Gather
from shoal.shell.groups import NodeGroups, choose, resolve
from shoal.shell.protocol import Ended, Selection
from shoal.shell.spread import Slots
from shoal.views import NodeView

outputs = st.lists(st.sampled_from([b"a\n", b"a\nb\n", b"c", b""]), min_size=1, max_size=40)


@given(outputs)
def test_identical_outputs_fold_as_clustershell_folds_their_nodes(per_node: list[bytes]) -> None:
    gather = Gather()
    for i, out in enumerate(per_node):
        gather.feed(f"n{i}", "stdout", out)
        gather.end(Ended(node=f"n{i}", code=0))
    folded = gather.folded("stdout")
    expected = {}
    for i, out in enumerate(per_node):
        if out:
            expected.setdefault(out.rstrip(b"\n"), []).append(f"n{i}")
    assert {text: str(nodes) for nodes, text in folded} == {
        text: str(NodeSet.fromlist(nodes)) for text, nodes in expected.items()
    }
    sizes = [len(nodes) for nodes, _ in folded]
    assert sizes == sorted(sizes, reverse=True)  # clush's order: the largest set first


@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=10))
def test_lines_do_not_depend_on_where_chunks_are_cut(data: bytes, cuts: list[int]) -> None:
    whole, pieces = Gather(), Gather()
    whole.feed("n1", "stdout", data)
    whole.end(Ended(node="n1", code=0))
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    for start, stop in zip(bounds, bounds[1:], strict=False):
        pieces.feed("n1", "stdout", data[start:stop])
    pieces.end(Ended(node="n1", code=0))
    assert pieces.output("n1", "stdout") == whole.output("n1", "stdout")
    assert whole.output("n1", "stdout") == (data if data.endswith(b"\n") or not data else data + b"\n")


def test_status_is_zero_unless_asked_for_the_largest_code() -> None:
    gather = Gather()
    for node, code in (("n1", 0), ("n2", 3), ("n3", 1)):
        gather.end(Ended(node=node, code=code))
    assert gather.status(max_code=False) == 0
    assert gather.status(max_code=True) == 3
    assert [(c, str(n)) for c, n in gather.codes()] == [(0, "n1"), (1, "n3"), (3, "n2")]
    gather.end(Ended(node="n4", failure="connect-timeout"))
    assert gather.status(max_code=True) == TIMED_OUT_STATUS
    assert [(f, str(n)) for f, _, n in gather.failures()] == [("connect-timeout", "n4")]


def view(name: str, *, gpus: int = 0, labels: dict[str, str] | None = None, **kw: object) -> NodeView:
    info = NodeInfo(
        name=name, hostname=name, capacity=Resources(cpus=4, mem=1024, gpus=gpus), labels=labels or {}
    )
    return NodeView(info=info, allocated=Resources(cpus=kw.pop("allocated", 0)), **kw)  # type: ignore[arg-type]


@pytest.fixture
def nodes() -> list[NodeView]:
    return [
        view("n1", gpus=2, labels={"rack": "r1"}, usage=Usage(cpu_percent=95)),
        view("n2", labels={"rack": "r1", "ssd": "true"}, allocated=1),
        view("n3", labels={"rack": "r2", "ssd": "no"}),
        view("n4", labels={"rack": "r2"}, status=NodeStatus.DOWN, connected=False),
    ]


def no_config(tmp_path: Path) -> GroupResolverConfig:
    return GroupResolverConfig([str(tmp_path / "missing.conf")])


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("@gpu", "n1"),
        ("@ssd", "n2"),
        ("@rack:r1", "n[1-2]"),
        ("@rack:*", "n[1-4]"),
        ("@up", "n[1-3]"),
        ("@down", "n4"),
        ("@hot", "n1"),
        ("@idle", "n3"),
        ("@all!@rack:r2", "n[1-2]"),
        ("n[1-9]&@up", "n[1-3]"),
    ],
)
def test_derived_groups(nodes: list[NodeView], tmp_path: Path, pattern: str, expected: str) -> None:
    assert str(resolve(NodeGroups(nodes, no_config(tmp_path)), [pattern])) == expected


def test_groups_conf_wins_over_derived_groups(nodes: list[NodeView], tmp_path: Path) -> None:
    (tmp_path / "groups.conf").write_text("[Main]\ndefault: local\n[local]\nmap: echo n3\nlist: echo gpu\n")
    groups = NodeGroups(nodes, GroupResolverConfig([str(tmp_path / "groups.conf")]))
    assert str(resolve(groups, ["@gpu"])) == "n3"
    assert str(resolve(groups, ["@rack:r1"])) == "n[1-2]"


def test_bad_patterns_name_the_option(nodes: list[NodeView], tmp_path: Path) -> None:
    groups = NodeGroups(nodes, no_config(tmp_path))
    with pytest.raises(SpecError, match="no group @nosuch") as bad_group:
        resolve(groups, group=["nosuch"])
    assert bad_group.value.field == "groups"
    with pytest.raises(SpecError, match="no node has a label or attribute 'zone'"):
        resolve(groups, ["@zone:a"])
    with pytest.raises(SpecError) as bad_set:
        resolve(groups, ["n1"], exclude=["n[1-"])
    assert bad_set.value.field == "exclude"


def test_choose_skips_down_nodes_and_picks_the_least_loaded(nodes: list[NodeView]) -> None:
    chosen = choose(nodes + [], Selection(nodes=["n[1-5]"]), lambda names: None)
    assert chosen.targets == ["n1", "n2", "n3"]
    assert set(chosen.down) == {"n4", "n5"}
    assert "not connected" in chosen.down["n4"] and "no agent" in chosen.down["n5"]
    least = choose(nodes, Selection(all=True, pick=2, least_loaded=True), lambda names: None)
    assert least.targets == ["n3", "n2"]  # n1 is hot; n2 has a cpu allocated
    shuffled = choose(nodes, Selection(all=True, pick=1), lambda names: names.reverse())
    assert shuffled.targets == ["n3"]


@given(st.integers(1, 6), st.integers(1, 3), st.lists(st.booleans(), max_size=60))
def test_spread_slots_never_overfill_and_fill_the_least_busy_first(
    nodes: int, per_node: int, ops: list[bool]
) -> None:
    names = [f"n{i}" for i in range(nodes)]
    slots = Slots(names, per_node)
    taken: list[str] = []
    for take in ops:
        if take:
            node = slots.take()
            if node is None:
                assert len(taken) == nodes * per_node
                continue
            # the chosen node had the fewest running, the earliest on ties
            fewest = min(slots.running(n) - (n == node) for n in names)
            assert slots.running(node) - 1 == fewest
            assert names.index(node) == min(
                names.index(n) for n in names if slots.running(n) - (n == node) == fewest
            )
            taken.append(node)
        elif taken:
            slots.give_back(taken.pop(0))
        assert all(0 <= slots.running(n) <= per_node for n in names)
        assert sum(slots.running(n) for n in names) == len(taken)
