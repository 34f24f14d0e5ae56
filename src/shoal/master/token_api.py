"""Tokens over HTTP (`/v1/tokens`), for admins: make one, list them, revoke one.

A token's secret is in the answer that makes it, and nowhere after: listings show its
public id, which is also what revokes it.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Path

from shoal.errors import NotFound
from shoal.master.auth import ID_LENGTH
from shoal.master.deps import MasterDep, admin
from shoal.master.store import TokenEntry
from shoal.views import ErrorBody, TokenCreated, TokenRequest, TokenView

router = APIRouter(dependencies=[Depends(admin)])

TokenId = Annotated[
    str, Path(pattern=rf"^[0-9a-f]{{{ID_LENGTH}}}$", description="the token's public id, as listed")
]


def token_view(public_id: str, entry: TokenEntry, now: float) -> TokenView:
    left = entry.uses_left()
    if entry.revoked is not None:
        state = "revoked"
    elif entry.expired(now):
        state = "expired"
    elif left is not None and left <= 0:
        state = "used"
    else:
        state = "active"
    return TokenView(
        id=public_id,
        name=entry.name,
        kind=entry.kind,
        role=entry.role,
        roles=entry.roles,
        created=entry.created,
        expires=entry.expires,
        last_used=entry.last_used,
        uses_left=left,
        revoked=entry.revoked,
        state=state,
    )


@router.post(
    "/v1/tokens", status_code=201, response_model=TokenCreated, responses={422: {"model": ErrorBody}}
)
async def create_token(body: TokenRequest, master: MasterDep) -> TokenCreated:
    """Make a token: an API token, or a bootstrap token that lets nodes join (`uses` times);
    its secret is in this answer only."""
    made = master.tokens.add(body.name, body.role, body.roles, kind=body.kind, ttl=body.ttl, uses=body.uses)
    return TokenCreated(
        id=made.id,
        name=body.name,
        kind=body.kind,
        role=body.role,
        roles=body.roles,
        expires=made.entry.expires,
        uses=body.uses,
        token=made.token,
    )


@router.get("/v1/tokens", response_model=list[TokenView])
async def tokens(master: MasterDep) -> list[TokenView]:
    """Every token, oldest first: its id, name, kind, role, when it was made and last used,
    when it expires, and a bootstrap token's uses left."""
    now = time.time()
    return [token_view(public_id, entry, now) for public_id, entry in master.tokens.listing()]


@router.post("/v1/tokens/{token_id}/revoke", response_model=TokenView, responses={404: {"model": ErrorBody}})
async def revoke_token(token_id: TokenId, master: MasterDep) -> TokenView:
    """Revoke a token from now on: every call with it is refused (401)."""
    entry = master.tokens.revoke(token_id)
    if entry is None:
        raise NotFound(f"no token {token_id}; `shoal token list` shows the ids")
    return token_view(token_id, entry, time.time())
