"""The master's choice of the Unix user a job runs as (`master/run_as.py`), and the names it takes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from shoal.config import MasterSettings
from shoal.errors import SpecError
from shoal.framework.protocol import Accept, TaskLaunch
from shoal.master.run_as import accept_as, job_as, resolve_user
from shoal.model import JobSpec

RUN_AS = {"alice": ["alice"], "ci": ["build", "test"]}
names = st.sampled_from(["alice", "bob", "build", "test", "root", "ci"])


def test_the_first_mapped_user_is_the_default() -> None:
    assert resolve_user(RUN_AS, "ci", False, None) == "build"
    assert resolve_user(RUN_AS, "alice", True, None) == "alice"


def test_no_user_and_no_mapping_leaves_it_to_the_agent() -> None:
    assert resolve_user(RUN_AS, "dave", False, None) is None
    assert resolve_user(RUN_AS, "admin", True, None) is None


def test_a_mapped_user_may_be_named() -> None:
    assert resolve_user(RUN_AS, "ci", False, "test") == "test"


def test_admins_may_name_anyone_root_included() -> None:
    assert resolve_user(RUN_AS, "admin", True, "root") == "root"
    assert resolve_user(RUN_AS, "ci", True, "alice") == "alice"


def test_a_user_not_mapped_is_forbidden_naming_the_field_and_what_to_do() -> None:
    with pytest.raises(SpecError) as refused:
        resolve_user(RUN_AS, "ci", False, "root")
    assert (refused.value.status, refused.value.field) == (403, "user")
    assert "ci may run tasks as build, test, not root" in refused.value.reason
    with pytest.raises(SpecError) as unmapped:
        resolve_user(RUN_AS, "dave", False, "dave")
    assert unmapped.value.status == 403 and "leave user out" in unmapped.value.reason


@given(principal=names, admin=st.booleans(), asked=st.none() | names)
def test_the_user_chosen_is_always_one_the_principal_may_have(
    principal: str, admin: bool, asked: str | None
) -> None:
    allowed = RUN_AS.get(principal, [])
    try:
        user = resolve_user(RUN_AS, principal, admin, asked)
    except SpecError:
        assert not admin and asked is not None and asked not in allowed
        return
    if asked is not None:
        assert user == asked
    else:
        assert user == (allowed[0] if allowed else None)
    assert user is None or admin or user in allowed


def test_a_job_spec_gets_its_user_filled_in() -> None:
    spec = job_as(JobSpec(command="true"), RUN_AS, "ci", False)
    assert spec.user == "build"
    same = JobSpec(command="true", user="test")
    assert job_as(same, RUN_AS, "ci", False) is same


def test_a_framework_accept_names_the_task_at_fault() -> None:
    call = Accept(
        offer_ids=["o1"],
        tasks=[TaskLaunch(name="a", command="true"), TaskLaunch(name="b", command="true", user="root")],
    )
    with pytest.raises(SpecError) as refused:
        accept_as(call, RUN_AS, "ci", False)
    assert refused.value.field == "tasks.1.user"
    decided = accept_as(call, RUN_AS, "ci", True)
    assert [t.user for t in decided.tasks] == ["build", "root"]
    assert [t.spec("default").user for t in decided.tasks] == ["build", "root"]


@pytest.mark.parametrize("name", ["alice", "_svc", "a.b-c_d", "x" * 32])
def test_unix_user_names_are_taken(name: str) -> None:
    assert JobSpec(command="true", user=name).user == name


@pytest.mark.parametrize("name", ["", "-alice", "1abc", "al ice", "alice:x", "x" * 33, "ålice"])
def test_names_that_are_not_unix_user_names_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="is not a Unix user name"):
        JobSpec(command="true", user=name)


def test_run_as_lists_at_least_one_valid_user_each() -> None:
    assert MasterSettings(run_as=RUN_AS).run_as == RUN_AS
    with pytest.raises(ValidationError):
        MasterSettings(run_as={"ci": []})
    with pytest.raises(ValidationError, match="is not a Unix user name"):
        MasterSettings(run_as={"ci": ["bad name"]})
