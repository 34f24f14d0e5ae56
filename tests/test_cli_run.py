"""`shoal run -n N` follows every task's output with a bounded number of streams."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from shoal.cli import jobs


class FakeClient:
    """Answers follows with one line per stream, counting how many are open at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = 0
        self.peak = 0
        self.followed: Counter[tuple[str, str]] = Counter()

    def follow(self, task_id: str, stream: str, attempt: int | None = None) -> Iterator[bytes]:
        with self.lock:
            self.open += 1
            self.peak = max(self.peak, self.open)
            self.followed[task_id, stream] += 1
        try:
            time.sleep(0.005)  # a stream stays open a while, as a running task's does
            yield f"{stream} of {task_id}\n".encode()
            yield b"no newline at the end"
        finally:
            with self.lock:
                self.open -= 1

    def wait(self, job_id: int, poll: float, limit: int) -> str:
        return f"the end of job {job_id}"


def test_many_tasks_are_followed_a_bounded_number_of_streams_at_a_time(capfdbinary) -> None:
    client = FakeClient()
    count = 5 * jobs.FOLLOWERS
    threads_before = threading.active_count()
    assert jobs._stream_until_done(client, 7, count) == "the end of job 7"  # type: ignore[arg-type]
    assert client.peak <= jobs.FOLLOWERS
    assert threading.active_count() - threads_before <= jobs.FOLLOWERS
    assert client.followed == Counter({(f"7.{i}", s): 1 for i in range(count) for s in ("stdout", "stderr")})
    out, err = capfdbinary.readouterr()
    for i in range(count):
        assert f"{i}: stdout of 7.{i}\n".encode() in out
        assert f"{i}: stderr of 7.{i}\n".encode() in err
        assert f"{i}: no newline at the end\n".encode() in out


def test_one_task_copies_its_output_as_it_is(capfdbinary) -> None:
    jobs._stream_until_done(FakeClient(), 3, 1)  # type: ignore[arg-type]
    out, err = capfdbinary.readouterr()
    assert (out, err) == (b"stdout of 3.0\nno newline at the end", b"stderr of 3.0\nno newline at the end")


def test_a_failed_stream_ends_the_following(capfdbinary) -> None:
    class Broken(FakeClient):
        def follow(self, task_id: str, stream: str, attempt: int | None = None) -> Iterator[bytes]:
            raise ConnectionError(f"lost {task_id}")
            yield b""

    with pytest.raises(ConnectionError, match="lost 1.0"):
        jobs._stream_until_done(Broken(), 1, 100)  # type: ignore[arg-type]
