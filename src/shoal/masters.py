"""Which master to talk to: the masters a client, an agent or a framework knows, the one
believed to lead, and the way one call goes through them. Pure logic, time an argument;
the HTTP and WebSocket shells (`client.py`, the drivers, the agent) do the I/O.

Several masters may serve one cluster: one leads, the others follow. What a follower says:

- to an API call, 307 with `Location: <leader><same path and query>` and
  `X-Shoal-Leader: <leader>` (base URLs): the call goes again to the leader, with its
  token (so we follow redirects ourselves: httpx drops the token on the way to another
  origin);
- with no leader known (an election under way), 503 with `Retry-After`, and
  `X-Shoal-Leader` present but empty: nothing was done, so any call may go again, to the
  next master. A leader that loses its leadership in the middle of a call answers 503 with
  `Retry-After` alone: a read goes again, but a write may or may not have been carried
  out, so that answer is the write's (its caller checks before repeating it). Any other
  503 is an ordinary error;
- to an agent's WebSocket, a close with code 4307 and the leader's base URL as the reason
  ("" when no leader is known);
- to a caller over its limit of calls a second (any master, before it looks at the call),
  429 with `Retry-After`: nothing was done, so any call goes again to the same master
  after that wait, a few times (`Patience`), before the 429 is the call's answer;
- `GET /v1/masters`, which any master answers: every master alive, and which leads.

Nothing here imports more than the standard library: the command line reads it to start.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from shoal.errors import ShoalError

NOT_LEADER_CLOSE = 4307  # WebSocket close code: "not the leader"; the reason names it
TRY_AGAIN_CLOSE = 1013  # WebSocket's "try again later": a master that cannot say who leads
POLICY_CLOSE = 1008  # WebSocket's "policy violation": this connection is refused; the reason says why
# "This node was removed from the cluster": its tasks are lost to the master, so its agent
# stops its runs. No other close does that: a refused connection may be a setting to fix.
REMOVED_CLOSE = 4403
LEADER_HEADER = "X-Shoal-Leader"
MASTERS_PATH = "/v1/masters"
FAILOVER = 15.0  # seconds a call keeps trying the masters: longer than an election takes
MAX_HOPS = 4  # redirects in a row before a call gives up: masters sending it round in circles
_FIRST_PAUSE, _MAX_PAUSE = 0.05, 1.0  # seconds between rounds of the masters: first, largest


@dataclass(frozen=True, slots=True)
class Patience:
    """How a call bears a master's rate limit: sent at most `tries` times in all while the
    answer is 429 with `Retry-After`, waiting what that asks, `longest` seconds at most."""

    tries: int = 4
    longest: float = 10.0


PATIENCE = Patience()


class Unreachable(ShoalError):
    """No master could be reached, or the connection was lost during a call; the message
    says which masters were tried, and whether a write may have been carried out."""


def check_url(entry: str) -> str:
    """One master's base URL, stripped, without a trailing slash; ValueError, naming it,
    for anything that is not an http(s) URL of a host."""
    given = entry.strip()
    url = given.rstrip("/")
    if not url:
        raise ValueError("a master URL is empty")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - parsed for its check: a port that is no number raises
    except ValueError as e:
        raise ValueError(f"{given!r} is not a master URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(
            f"{given!r} is not a master URL: want http(s)://HOST[:PORT], as http://10.0.0.1:8470"
        )
    return url


def parse_urls(text: str) -> list[str]:
    """The masters' base URLs in `text`: one URL, or several separated by commas; the same
    URL twice counts once."""
    urls: list[str] = []
    for entry in text.split(","):
        if not entry.strip():
            raise ValueError(f"an empty entry in the master URLs {text!r}")
        if (url := check_url(entry)) not in urls:
            urls.append(url)
    return urls


class Masters:
    """The masters known, in the order given, and the one believed to lead. Thread-safe:
    a client's calls, its watches and a driver's stream share one, so what one learns the
    others use.

    Calls go to `current`: the leader once one is known, else the first master not yet
    failed. A master that fails is passed over until the others have failed too, so
    masters are tried in turn, round and round.
    """

    def __init__(self, urls: str | Iterable[str]) -> None:
        listed = parse_urls(urls) if isinstance(urls, str) else list(dict.fromkeys(map(check_url, urls)))
        if not listed:
            raise ValueError("no master URL given")
        self._urls = listed
        self._at = 0  # the master tried first while no leader is known
        self._leader: str | None = None
        self._unlisted = False  # a redirect named a master not given: worth asking for them all
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._urls)

    @property
    def urls(self) -> list[str]:
        with self._lock:
            return list(self._urls)

    @property
    def leader(self) -> str | None:
        with self._lock:
            return self._leader

    @property
    def current(self) -> str:
        with self._lock:
            return self._leader or self._urls[self._at]

    def candidates(self) -> list[str]:
        """Every master known, in the order to try them: the leader, then the others."""
        with self._lock:
            turn = self._urls[self._at :] + self._urls[: self._at]
            return [u for u in [self._leader] if u] + [u for u in turn if u != self._leader]

    def learned(self, url: str) -> None:
        """A redirect or a close named `url` the leader (ValueError if it is no URL)."""
        url = check_url(url)
        with self._lock:
            if url not in self._urls:
                self._urls.append(url)
                self._unlisted = True
            self._leader = url

    def failed(self, url: str) -> None:
        """`url` did not answer, or could not serve: move on to the next master. A failure
        another thread already moved past moves nothing further."""
        with self._lock:
            if url == self._leader:
                self._leader = None
            if self._urls[self._at] == url:
                self._at = (self._at + 1) % len(self._urls)

    def add(self, urls: Iterable[str]) -> None:
        """Masters heard of (as `GET /v1/masters` lists them), after those known; ValueError,
        with nothing added, if one is no URL."""
        checked = [check_url(u) for u in urls]
        with self._lock:
            self._urls.extend(u for u in dict.fromkeys(checked) if u not in self._urls)

    def wants_listing(self) -> bool:
        """True once after a redirect named a master the configuration did not: the caller
        should ask any master for the whole list (`listed`), so it can go on past the loss
        of every master it was told of."""
        with self._lock:
            wanted, self._unlisted = self._unlisted, False
            return wanted

    def listed(self, body: bytes) -> None:
        """What `GET /v1/masters` answered: every master is added, and the leader learned.
        An answer of another shape changes nothing: the list is a help, not a need, and a
        master of an older release does not know the call."""
        try:
            entries = json.loads(body)
            urls = [(check_url(e["url"]), e.get("leader") is True) for e in entries]
        except (ValueError, TypeError, KeyError, AttributeError):
            return
        self.add(u for u, _ in urls)
        for url, leads in urls:
            if leads:
                self.learned(url)


def leader_of(headers: Mapping[str, str], path: str) -> str | None:
    """The leader a 307 names: `X-Shoal-Leader`, else `Location` less the path asked for.
    `headers` as httpx gives them (any case), or spelt as the protocol does."""
    if named := headers.get(LEADER_HEADER):
        return named
    location = headers.get("Location", "").split("?", 1)[0]
    if location.endswith(path) and len(location) > len(path):
        return location[: len(location) - len(path)]
    return None


class Failover:
    """One call's way through the masters.

    The shell sends the call to `masters.current` and tells the outcome: `answered` (an
    HTTP answer; `headers` as httpx gives them, or spelt as the protocol does), `broke`
    (the connection failed). Each returns how many seconds to wait
    before sending again (None from `answered`: the answer is the call's), or raises
    `Unreachable`. A redirect is followed at once, at most `MAX_HOPS` in a row. A master
    that failed is left for the next; once every master known has been tried, a pause,
    growing from 50 ms to a second, comes before each new round, until `within` seconds
    have gone by. A single master that cannot be reached fails the call at once: there is
    nowhere else to go, and a command must not hang on a master that is not running.

    A call is repeated after a connection broke only if nothing was sent (`sent=False`) or
    it is `safe` to repeat (GET, HEAD, a content-addressed upload): a write whose answer
    was lost may or may not have been carried out, which only its caller can check. A 429
    with `Retry-After` is a master's rate limit, which refuses a call before doing anything:
    any call goes again after the wait it asks (as `patience` allows), however long the
    masters took before; the last 429 is the call's answer.
    """

    def __init__(
        self,
        masters: Masters,
        path: str,
        *,
        safe: bool,
        now: float,
        within: float,
        patience: Patience = PATIENCE,
    ) -> None:
        self._masters = masters
        self._path = path
        self._safe = safe
        self._within = within
        self._deadline = now + within
        self._patience = patience
        self._limited = 0  # answers of 429 so far
        self._tried: dict[str, str] = {}  # each master tried, and what came of it last
        self._round: set[str] = set()  # the masters tried since the last pause
        self._pause = _FIRST_PAUSE
        self._hops: list[str] = []  # the redirects in a row, for the message

    def answered(self, url: str, status: int, headers: Mapping[str, str], now: float) -> float | None:
        if status == 307:
            return self._redirected(url, leader_of(headers, self._path))
        if status == 503 and headers.get("Retry-After") is not None:
            if self._safe or headers.get(LEADER_HEADER) is not None:
                return self._failed(url, "no leader yet (503)", now, alive=True)
        if status == 429 and (after := headers.get("Retry-After")) is not None:
            return self._slowed(after)
        return None

    def _slowed(self, after: str) -> float | None:
        """The wait before a call refused for the rate goes again; None once it has been
        sent as many times as `patience` allows."""
        self._limited += 1
        self._hops = []
        if self._limited >= self._patience.tries:
            return None
        try:
            wait = max(0.0, float(after))
        except ValueError:  # an HTTP date: masters send seconds, so it is no master's
            wait = self._patience.longest
        return min(wait, self._patience.longest)

    def broke(self, url: str, error: str, *, sent: bool, now: float) -> float:
        if sent and not self._safe:
            raise Unreachable(
                f"lost the master at {url} after the call was sent ({error}): it may or may not "
                "have been carried out; check before repeating it"
            )
        return self._failed(url, error, now, alive=False)

    def _redirected(self, url: str, leader: str | None) -> float:
        self._round.add(url)
        self._hops.append(url)
        if leader is None:
            raise Unreachable(f"the master at {url} redirected the call without naming the leader")
        if len(self._hops) > MAX_HOPS:
            trail = " -> ".join([*self._hops, leader])
            raise Unreachable(f"the masters sent the call round in circles ({trail}); try again shortly")
        try:
            self._masters.learned(leader)
        except ValueError as e:
            raise Unreachable(f"the master at {url} named a leader that is no URL: {e}") from None
        self._tried[url] = f"redirected to {leader}"
        return 0.0

    def _failed(self, url: str, why: str, now: float, *, alive: bool) -> float:
        self._tried[url] = why
        self._round.add(url)
        self._hops = []
        self._masters.failed(url)
        if not alive and len(self._masters) == 1:
            raise Unreachable(
                f"no master answers at {url} ({why}); start one with `shoal dev`, or set SHOAL_URL"
            )
        if now >= self._deadline:
            tried = "; ".join(f"{u}: {why}" for u, why in self._tried.items())
            raise Unreachable(
                f"no master served the call within {self._within:g}s ({tried}); check that the masters "
                "run, and that SHOAL_URL or the client file's url lists them (separated by commas)"
            )
        if self._masters.current not in self._round:
            return 0.0
        self._round.clear()
        pause, self._pause = min(self._pause, self._deadline - now), min(2 * self._pause, _MAX_PAUSE)
        return pause
