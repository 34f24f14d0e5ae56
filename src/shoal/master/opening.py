"""How a master process comes up and goes down: alone on SQLite, or one of several on etcd.

`lifespan` is the API's: it opens the store, the tokens and the ledger, serves DNS and the
clock, and on etcd campaigns for the leadership (`ha.reign`), serving only while it leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import pathlib
import socket
import urllib.parse
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from pydantic import SecretStr

from shoal.config import MasterSettings
from shoal.errors import ShoalError
from shoal.files import write_secret
from shoal.master.auth import Tokens, new_token
from shoal.master.blobs import BlobStore
from shoal.master.dns import free_dns_port, serve_dns
from shoal.master.frameworks import FrameworkPolicy
from shoal.master.ha import endpoint_of, reign
from shoal.master.identities import Identities
from shoal.master.leadership import Member, Seat
from shoal.master.ledger import Retention
from shoal.master.server import Master, tune_collector
from shoal.master.store import Store
from shoal.master.store.etcd import EtcdStore
from shoal.master.store.gateway import Gateway, parse_store_url
from shoal.master.store.sqlite import SqliteStore
from shoal.model import Role

log = logging.getLogger("shoal.master")


def _secret_file(path: pathlib.Path, given: str | None) -> str:
    """The token in `path`; made (or taken from `given`) and saved there, mode 0600."""
    if given is None and path.exists():
        return path.read_text().strip()
    token = given or new_token()
    write_secret(path, token + "\n")
    return token


def _reveal(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret is not None else None


def open_master(
    settings: MasterSettings, store: Store | None = None, may_act: Callable[[], bool] = lambda: True
) -> Master:
    """The master over its state directory and `store` (default: SQLite there): tokens
    (made on first start), blobs, the ledger loaded from the store. `may_act`: whether it
    may still act as leader (several masters)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    store = store or SqliteStore(
        settings.state_dir / "shoal.db", fsync=settings.fsync, audit_limit=settings.audit_retention_count
    )
    tokens = _tokens(settings, store)
    tokens.seed(
        "admin", Role.ADMIN, _secret_file(settings.state_dir / "admin.token", _reveal(settings.admin_token))
    )
    blobs = BlobStore(settings.state_dir / "blobs", settings.blob_quota)
    frameworks = FrameworkPolicy(
        offer_timeout=settings.offer_timeout,
        patience=settings.offer_patience,
        interval=settings.offer_interval,
    )
    return Master(
        store,
        tokens,
        blobs,
        settings.policy(),
        settings.heartbeat_timeout,
        settings.tick,
        frameworks,
        settings.rebalancing(),
        Retention(settings.job_retention, settings.job_retention_count),
        settings.registry(),
        [endpoint_of(_me(settings))],
        fence_agents=settings.fences_agents(),
        may_act=may_act,
        identities=_identities(settings, store),
    )


def _identities(settings: MasterSettings, store: Store) -> Identities | None:
    """Nodes known by the certificates this master signs; None on plain HTTP (the cluster token)."""
    return None if settings.insecure else Identities(store, settings.tls_files(), settings.node_cert_days)


def _tokens(settings: MasterSettings, store: Store, read_only: bool = False) -> Tokens:
    """The tokens; a cluster token (made on first start, in cluster.token) on plain HTTP only:
    over TLS nodes present their certificates, and a shared secret would only open doors."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    cluster_token = None
    if settings.insecure:
        cluster_token = _secret_file(settings.state_dir / "cluster.token", _reveal(settings.cluster_token))
    return Tokens(store, cluster_token, read_only=read_only)


def _me(settings: MasterSettings) -> Member:
    """This master as its peers and clients reach it, and as the registry lists it."""
    address = f"{settings.advertise or _address_of(settings.host)}:{settings.port}"
    scheme = "http" if settings.insecure else "https"
    return Member(settings.name or address, f"{scheme}://{address}", settings.dns_port)


def unreachable_address(settings: MasterSettings) -> str | None:
    """Why other machines could not reach this master at the address it gives its peers,
    agents and clients (loopback, while etcd is elsewhere); None when it is fine."""
    if settings.store == "sqlite":
        return None
    address = ipaddress.IPv4Address(urllib.parse.urlsplit(_me(settings).url).hostname)
    etcd = [urllib.parse.urlsplit(url).hostname or "" for url in parse_store_url(settings.store)]
    if address.is_loopback and not all(_is_loopback(host) for host in etcd):
        return (
            f"this master would tell the others it is at {address}, which only this machine "
            "reaches; give the address they reach it at with --advertise"
        )
    return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _address_of(host: str) -> str:
    """The IPv4 address a master listening on `host` is reached at: the host itself, or for a
    wildcard or a name, what this machine's name resolves to (`advertise` says better)."""
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        address = None
    if address is not None and not address.is_unspecified:
        return host
    try:
        return socket.gethostbyname(host if address is None else socket.gethostname())
    except OSError:
        return "127.0.0.1"


@contextlib.asynccontextmanager
async def _serving(
    app: FastAPI,
    settings: MasterSettings,
    store: Store | None = None,
    may_act: Callable[[], bool] = lambda: True,
) -> AsyncIterator[Master]:
    """Serve as the leader (or the only master) on `store` until the block ends. The ledger
    loads on a thread: meanwhile the loop still answers (come back in a second), and agents
    learn that no leader is counting their silence yet."""
    master = await asyncio.to_thread(open_master, settings, store, may_act)
    tune_collector()
    dns = await serve_dns(master.state.registry, settings)
    log.info("DNS for .shoal on %s port %d (UDP and TCP)", settings.dns_host or settings.host, dns.port)
    ticker = asyncio.create_task(master.tick_loop())
    # The leader's tokens, not a follower's: revocations and uses are its to know at once.
    as_follower = getattr(app.state, "tokens", None)
    app.state.master, app.state.tokens = master, master.tokens
    try:
        yield master
    finally:
        app.state.master, app.state.tokens = None, as_follower
        with contextlib.suppress(ShoalError):  # a deposed master writes nothing more
            master.tokens.write_uses()
        master.stand_down()
        ticker.cancel()
        await dns.close()
        master.store.close()


@contextlib.asynccontextmanager
async def _several(app: FastAPI, settings: MasterSettings) -> AsyncIterator[None]:
    """One of several masters on etcd: serve whenever elected, point at the leader otherwise."""
    gateway = Gateway(parse_store_url(settings.store))
    prefix = settings.etcd_prefix
    seat = Seat(gateway, prefix, _me(settings), settings.lease_ttl)
    app.state.seat = seat
    # Followers authenticate too (`GET /v1/masters`): the tokens are read from etcd.
    follower_store = EtcdStore(gateway, prefix, fence=0, leader_key=seat.leader_key)
    app.state.tokens = _tokens(settings, follower_store, read_only=True)

    def serving(token: int) -> contextlib.AbstractAsyncContextManager[Master]:
        store = EtcdStore(
            gateway,
            prefix,
            fence=token,
            leader_key=seat.leader_key,
            audit_limit=settings.audit_retention_count,
            time_left=seat.time_left,
        )
        return _serving(app, settings, store, seat.may_act)

    seat.start()
    reigning = asyncio.create_task(reign(seat, serving))
    try:
        yield
    finally:
        reigning.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reigning
        await asyncio.to_thread(seat.resign)  # a follower takes over now, not a TTL later
        gateway.close()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI, settings: MasterSettings) -> AsyncIterator[None]:
    """A master process's life: alone on SQLite, or one of several on etcd."""
    # A DNS port of 0 is chosen now, so the registry lists the port DNS is served on.
    dns_port = settings.dns_port or free_dns_port(settings.dns_host or settings.host)
    served = settings.model_copy(update={"dns_port": dns_port})
    app.state.me = _me(served)
    app.state.streams_per_caller = settings.streams_per_caller  # GET /v1/stream
    app.state.seat = None
    app.state.master = None
    if settings.store == "sqlite":
        async with _serving(app, served):
            yield
    else:
        async with _several(app, served):
            yield
