"""What a node and the master say of the node's identity: the join and renewal requests
and answers (`POST /v1/nodes/join`, `POST /v1/nodes/{name}/renew`), and what removing a
node did (`DELETE /v1/nodes/{name}`). Read by the master, the agent and the client."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from shoal.model import NodeName

MAX_CSR = 16_384  # characters: a P-256 request is well under 1,000
# Characters of a node name a certificate holds: its common name's bound (RFC 5280), under
# the 253 a node name may otherwise have.
MAX_CERTIFIED_NAME = 64


class JoinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[NodeName, Field(max_length=MAX_CERTIFIED_NAME)] = Field(
        description="the node's name, 64 characters at most: its certificate is made out to it"
    )
    csr: str = Field(min_length=1, max_length=MAX_CSR, description="a PEM certificate signing request")


class RenewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    csr: str = Field(min_length=1, max_length=MAX_CSR, description="a PEM certificate signing request")


class NodeCertificateView(BaseModel):
    """A certificate the master signed for a node, and the cluster CA's, both PEM."""

    name: str
    certificate: str
    serial: str
    not_after: float = Field(description="seconds since the epoch")
    ca: str


class NodeRemoved(BaseModel):
    name: str
    identity: bool = Field(description="whether it had a certificate, now refused")
    tasks: list[str] = Field(description="the tasks it held: lost, to run elsewhere as their restart says")
