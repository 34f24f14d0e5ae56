"""Events as the JSON lines a framework's stream carries. Offers are written by hand, not
through pydantic: an offer cycle on a large cluster sends thousands. Pure."""

from __future__ import annotations

import json

from shoal.framework import protocol as p
from shoal.master.events import OffersMade
from shoal.master.ledger import Ledger


class OfferLines:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._nodes: dict[str, tuple[object, str]] = {}  # node -> (its info, its part of an offer)

    def encode(self, event: p.Told | OffersMade) -> bytes:
        """An event as the JSON line its framework reads."""
        if not isinstance(event, OffersMade):
            return event.model_dump_json().encode() + b"\n"
        dims = self.ledger.table.dims
        parts = []
        for offer in event.offers:
            a = offer.amount.tolist()
            custom = {d: v for d, v in zip(dims[4:], a[4:], strict=False) if v > 0}
            resources = {
                "cpus": round(a[0], 6),
                "mem": int(a[1]),
                "disk": int(a[2]),
                "gpus": int(a[3]),
                "custom": custom,
            }
            parts.append(
                f'{{"id":"{offer.id}",{self._node(offer.node)},"resources":{json.dumps(resources)}}}'
            )
        return ('{"type":"offers","offers":[' + ",".join(parts) + "]}\n").encode()

    def _node(self, name: str) -> str:
        """The node's part of an offer, kept while the node reports the same."""
        info = self.ledger.nodes[name].info
        cached = self._nodes.get(name)
        if cached is None or cached[0] is not info:
            fields = {
                "node": name,
                "hostname": info.hostname,
                "attributes": {**info.labels, **info.attributes},
            }
            cached = self._nodes[name] = (info, json.dumps(fields)[1:-1])
        return cached[1]
