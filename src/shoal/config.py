"""Settings of the master and the agent (the client's file is `clientfile.py`).

Each comes from, strongest first: command-line flags, `SHOAL_*` environment variables, a
TOML file (`--config FILE`), then the defaults here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, TomlConfigSettingsSource

from shoal.clientfile import DEFAULT_PORT, DEFAULT_URL, MasterURLs
from shoal.model import Resources, Strategy, UserName
from shoal.services import IPv4

if TYPE_CHECKING:
    from shoal.core.scheduler import Policy
    from shoal.master.moves import Rebalancing
    from shoal.master.registry import RegistryPolicy
    from shoal.tls import TlsFiles


def data_home() -> Path:
    """Where shoal keeps its state unless told otherwise (the XDG data home)."""
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "shoal"


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHOAL_", extra="forbid")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, **_):  # type: ignore[no-untyped-def]
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


class QueueSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    order: Literal["fifo", "priority", "fair"] = "priority"
    weight: float = Field(1.0, gt=0)
    guarantee: float = Field(0.0, ge=0, le=1, description="share of the cluster it is sure to get")
    limit: float = Field(1.0, gt=0, le=1, description="share of the cluster it never passes")
    backfill: Literal["easy", "conservative", "none"] = Field(
        "easy",
        description="easy: the first job that cannot start holds a reservation, later ones start "
        "only where they delay it; conservative: the first `backfill_depth` such jobs get one; "
        "none: strict order, a job that cannot start holds back every job behind it",
    )
    backfill_depth: int = Field(
        100, ge=1, le=10_000, description="waiting jobs given a reservation each cycle (conservative)"
    )
    default_time_limit: float | None = Field(
        None,
        gt=0,
        le=365 * 86_400,
        description="seconds assumed, for reservations, for jobs without a time limit (not enforced)",
    )

    @model_validator(mode="after")
    def _guarantee_within_limit(self) -> QueueSettings:
        if self.guarantee > self.limit:
            raise ValueError(f"guarantee {self.guarantee} is above limit {self.limit}")
        return self


class MasterSettings(_Settings):
    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    state_dir: Path = Field(default_factory=lambda: data_home() / "master")
    fsync: bool = Field(
        True,
        description="sync every acknowledged change to disk before answering "
        "(off: faster, but a power loss may lose the last changes)",
    )
    job_retention: float = Field(
        3600.0, ge=0, description="seconds a finished job is kept (then pruned, as Nomad's job GC)"
    )
    job_retention_count: int = Field(
        10_000, ge=0, le=10_000_000, description="finished jobs (and migrations) kept at most"
    )
    audit_retention_count: int = Field(100_000, ge=1, description="audit records kept at most")
    heartbeat_timeout: float = Field(10.0, gt=0, description="seconds of silence before a node is down")
    tick: float = Field(0.5, gt=0, description="seconds between checks of timeouts and delays")
    max_body: int = Field(
        4 << 20, ge=1024, le=1 << 30, description="bytes a request's body may hold (blob uploads aside)"
    )
    blob_max: int = Field(4 << 30, ge=1, description="bytes an uploaded blob (`shoal copy`) may hold")
    blob_quota: int = Field(16 << 30, ge=1, description="bytes the blob store holds at most, in all")
    rate_limit: float = Field(
        100.0,
        ge=0,
        le=1e6,
        description="calls a second each caller (token, or address without one) may keep up; 0: no limit",
    )
    rate_burst: int = Field(200, ge=1, le=1_000_000, description="calls a caller may make at once")
    rate_tarpit: float = Field(
        1.0, ge=0, le=10, description="seconds a call over the limit is held before its 429, at most"
    )
    header_timeout: float = Field(
        10.0, gt=0, le=300, description="seconds a connection has to send a request's headers"
    )
    idle_timeout: float = Field(
        5.0, gt=0, le=3600, description="seconds an idle keep-alive connection is kept"
    )
    ws_max: int = Field(
        8 << 20, ge=1 << 16, le=1 << 30, description="bytes of one message from an agent, at most"
    )
    streams_per_caller: int = Field(
        64,
        ge=1,
        le=1024,
        description="event streams (GET /v1/stream) one token name may hold open at once, of the "
        "1024 a master serves (each dashboard tab and `shoal events -f` holds one)",
    )
    admin_token: SecretStr | None = None
    cluster_token: SecretStr | None = None
    strategy: Strategy = Strategy.SPREAD
    preemption: bool = True
    queues: dict[str, QueueSettings] = Field(default_factory=lambda: {"default": QueueSettings()})
    user_weights: dict[str, float] = Field(default_factory=dict)
    run_as: dict[str, Annotated[list[UserName], Field(min_length=1)]] = Field(
        default_factory=dict,
        description="API principal (token name) -> the Unix users its jobs may run as; the first is "
        "its default (admins may name any user)",
    )
    offer_timeout: float = Field(30.0, gt=0, description="seconds before an unanswered offer is rescinded")
    rebalance: Literal["off", "spread", "consolidate"] = Field(
        "off", description="the rebalancing loop: off, spread (even the load out) or consolidate"
    )
    rebalance_every: float = Field(15.0, gt=0, description="seconds between rebalancing rounds")
    rebalance_threshold: float = Field(0.10, gt=0, lt=1, description="how far above the mean a node is hot")
    rebalance_budget: int = Field(4, ge=1, le=10_000, description="migrations a round, at most")
    rebalance_cooldown: float = Field(120.0, ge=0, description="seconds before a moved task may move again")
    offer_interval: float = Field(0.05, ge=0, le=10, description="seconds at least between offer cycles")
    offer_patience: float = Field(
        1.0, ge=0, description="seconds an offer is held before a starved framework may claim it"
    )
    advertise: IPv4 | None = Field(
        None,
        description="the IPv4 address the master is reached at, as the registry gives it (default: host)",
    )
    shutdown_delay: float | None = Field(
        None,
        ge=0,
        le=3600,
        description="seconds a task with services waits, out of the registry, before SIGTERM (jobs may "
        "say; default: dns_ttl + 1, so clients that cached an answer have let it go)",
    )
    dns_port: int = Field(
        8600, ge=0, le=65535, description="UDP and TCP port of the DNS server (0: any free)"
    )
    dns_host: str | None = Field(None, description="where the DNS server listens (default: host)")
    dns_ttl: int = Field(2, ge=0, le=86_400, description="seconds answers may be cached")
    dns_negative_ttl: int = Field(5, ge=0, le=86_400, description="seconds NXDOMAIN and NODATA may be cached")
    dns_upstream: str | None = Field(
        None, description="HOST:PORT of a resolver for names outside .shoal (default: REFUSED)"
    )
    dns_load_aware: bool = Field(True, description="answers list endpoints on the least loaded nodes first")
    store: str = Field(
        "sqlite",
        description="sqlite (a file in state_dir, for one master) or etcd://HOST:PORT,HOST:PORT,... "
        "(several masters share it; one leads)",
    )
    name: str | None = Field(None, description="this master's name among several (default: ADDRESS:PORT)")
    lease_ttl: float = Field(
        2.0, ge=2, le=60, description="seconds a silent leader keeps its lease (failover takes about this)"
    )
    etcd_prefix: str = Field("/shoal/", pattern=r"^/[\w./-]*/$", description="the keys' prefix in etcd")
    fence_agents: bool | None = Field(
        None,
        description="agents cut off from every master stop their tasks before the heartbeat timeout, "
        "so none runs twice at once (default: on with etcd, off with sqlite)",
    )

    tls_dir: Path | None = Field(
        None,
        description="the cluster CA and this master's certificate, from `shoal tls init` "
        "(default: state_dir/tls); the master serves HTTPS only",
    )
    insecure: bool = Field(
        False,
        description="plain HTTP, no TLS; agents join with the cluster token (throwaway use)",
    )
    node_cert_days: float = Field(
        30.0,
        gt=0,
        le=3650,
        description="days a node's certificate lasts; agents renew theirs two thirds of the way through",
    )

    def tls_files(self) -> TlsFiles:
        from shoal.tls import TlsFiles

        return TlsFiles(self.tls_dir or self.state_dir / "tls")

    def fences_agents(self) -> bool:
        return self.fence_agents if self.fence_agents is not None else self.store != "sqlite"

    @field_validator("store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value != "sqlite" and not value.startswith("etcd://"):
            raise ValueError("expected sqlite or etcd://HOST:PORT[,HOST:PORT...]")
        return value

    @model_validator(mode="after")
    def _outlasts_a_failover(self) -> MasterSettings:
        # Agents stop their tasks after 0.6 of the heartbeat timeout without a master (see
        # agent/state.py); a failover takes the lease's TTL and a little more.
        if self.store != "sqlite" and self.heartbeat_timeout < 3 * self.lease_ttl:
            raise ValueError(
                f"heartbeat_timeout {self.heartbeat_timeout:g}s is too short for lease_ttl "
                f"{self.lease_ttl:g}s: agents would stop their tasks during a failover; "
                f"make it {3 * self.lease_ttl:g}s or more"
            )
        return self

    @field_validator("queues")
    @classmethod
    def _has_default(cls, value: dict[str, QueueSettings]) -> dict[str, QueueSettings]:
        if sum(q.guarantee for q in value.values()) > 1 + 1e-9:
            raise ValueError("the queues' guarantees add up to more than the whole cluster")
        return {"default": QueueSettings(), **value}

    @field_validator("user_weights")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        if any(w <= 0 for w in value.values()):
            raise ValueError("weights must be positive")
        return value

    def registry(self) -> RegistryPolicy:
        from shoal.master.registry import RegistryPolicy

        delay = self.shutdown_delay if self.shutdown_delay is not None else self.dns_ttl + 1.0
        return RegistryPolicy(shutdown_delay=delay, load_aware=self.dns_load_aware)

    def rebalancing(self) -> Rebalancing:
        from shoal.core.rebalance import RebalancePolicy
        from shoal.master.moves import Rebalancing

        policy = RebalancePolicy(
            mode="consolidate" if self.rebalance == "consolidate" else "spread",
            threshold=self.rebalance_threshold,
            budget=self.rebalance_budget,
            cooldown=self.rebalance_cooldown,
        )
        return Rebalancing(policy=policy, loop=self.rebalance != "off", every=self.rebalance_every)

    def policy(self) -> Policy:
        """The scheduling policy these settings describe."""
        # Imported here: the client reads these settings too, and needs no numpy to start.
        from shoal.core.scheduler import Policy, QueuePolicy

        return Policy(
            queues={
                name: QueuePolicy(
                    q.order,
                    q.weight,
                    q.guarantee,
                    q.limit,
                    backfill=q.backfill,
                    depth=q.backfill_depth,
                    default_limit=q.default_time_limit,
                )
                for name, q in self.queues.items()
            },
            user_weights=self.user_weights,
            strategy=self.strategy,
            preemption=self.preemption,
        )


class AgentSettings(_Settings):
    master: MasterURLs = Field(
        DEFAULT_URL,
        description="the master's URL, or several masters' separated by commas: the agent joins the leader",
    )
    cluster_token: SecretStr | None = Field(
        None, description="the shared cluster token, for a master on plain HTTP (`--insecure`) only"
    )
    ca: Path | None = Field(None, description="the cluster CA's certificate (ca.pem), to verify the master")
    bootstrap_token: SecretStr | None = Field(
        None,
        description="a bootstrap token to join with once: the master then gives this node a certificate "
        "of its own (kept in state_dir/identity), and the token is not needed again",
    )
    name: str | None = None
    state_dir: Path = Field(default_factory=lambda: data_home() / "agent")
    labels: dict[str, str] = Field(default_factory=dict)
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom resources this node offers, e.g. licenses = 4"
    )
    cpus: float | None = Field(None, gt=0)
    mem: int | None = Field(None, gt=0, description="MiB")
    heartbeat_interval: float = Field(1.0, gt=0)
    address: IPv4 | None = Field(
        None, description="the IPv4 address tasks here are reached at (default: the one facing the master)"
    )
    port_range: tuple[int, int] = Field((20000, 32000), description="tasks' dynamic ports come from here")
    limits: bool = Field(True, description="hold tasks to their cpus and mem with cgroups")
    utilization: Literal["host", "tasks"] = Field(
        "host",
        description="host: the machine's CPU use; tasks: its tasks' over its cpus (agents sharing a host)",
    )
    keep_sandboxes: float = Field(
        86_400.0, ge=0, description="seconds a finished run's sandbox and logs are kept"
    )
    restore_limit: int = Field(
        10 * 1024, gt=0, description="MiB a run's saved state may unpack to, when its job asks for no disk"
    )
    task_user: UserName | None = Field(
        None, description="the Unix user tasks that name none run as (default: the agent's own)"
    )
    allow_root: bool = Field(False, description="run tasks as root (uid 0) when they would be")
    shell_user: UserName | None = Field(
        None, description="the Unix user `shoal exec` commands run as (default: the agent's own)"
    )
    # Prometheus metrics: a listener of the agent's own, off unless given a port.
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve GET /metrics on this port (default: no listener)"
    )
    metrics_address: str = Field(
        "127.0.0.1", description="the address the metrics listener binds (0.0.0.0: every one)"
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="the bearer token a scrape must bring (a metrics token the master made will do); "
        "needed with metrics_port",
    )

    @field_validator("resources")
    @classmethod
    def _custom(cls, value: dict[str, float]) -> dict[str, float]:
        return Resources(custom=value).custom  # the names and amounts a node may declare

    @field_validator("port_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1] <= 65535:
            raise ValueError("a range LOW, HIGH with 1 <= LOW <= HIGH <= 65535")
        return value

    @model_validator(mode="after")
    def _metrics_need_a_token(self) -> AgentSettings:
        token = self.metrics_token.get_secret_value() if self.metrics_token is not None else ""
        if self.metrics_port is not None and not token:
            raise ValueError(
                "metrics_port needs metrics_token: every scrape must bring a token "
                "(`shoal token create prometheus --metrics` makes one)"
            )
        return self


def shared_host_ports(index: int, agents: int) -> tuple[int, int]:
    """A port range of its own for the `index`-th of `agents` agents on one machine (`shoal
    dev`, tests): their tasks' dynamic ports must not collide, as on separate machines.
    500 ports each, fewer when that many agents would run past 65535."""
    width = min(500, (65536 - 20000) // agents)
    low = 20000 + width * index
    return (low, low + width - 1)


S = TypeVar("S", bound=_Settings)


def load_settings(cls: type[S], config_file: Path | None, **flags: Any) -> S:
    """`cls` from flags (None means not given), the environment and `config_file`."""

    class Configured(cls):  # type: ignore[valid-type,misc]
        model_config = {**cls.model_config, "toml_file": config_file}

    return Configured(**{k: v for k, v in flags.items() if v is not None})
