"""FHIR resources kept as sent: Practitioner, Organization, DocumentReference,
CommunicationRequest, and Binary contents.

Seed 001's flow posts a document in steps (Binary, then DocumentReference, then
CommunicationRequest) and each step refers to the previous ones: these are the rows those
references resolve against. The engine reads a few fields of them (the Binary's bytes, the
DocumentReference's type and title, the author's RPPS); the rest is kept and answered back as
sent. Binary bytes live apart from the resource rows, like document payloads.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import NoResultFound

from medcourier.engine.clock import now
from medcourier.engine.directory import server_meta
from medcourier.engine.payload_read import DIRECT_READ_BYTES, read_large
from medcourier.engine.payload_write import insert_row
from medcourier.engine.schema import binaries, resources


class ResourceStore:
    """Resource operations; mixed into ``Store``, which provides ``self.engine``."""

    engine: Engine

    def tx_put_resource(
        self,
        c: Connection,
        resource: dict[str, Any],
        transaction_id: str | None = None,
    ) -> dict[str, Any]:
        """Store a new resource under a server-assigned id; returns it as it will be read."""
        return insert_resource(c, resource, transaction_id)

    def get_resource(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        found = self.get_resource_row(resource_type, resource_id)
        return found[0] if found is not None else None

    def get_resource_row(
        self, resource_type: str, resource_id: str
    ) -> tuple[dict[str, Any], str | None] | None:
        """The resource and the transaction id it is linked to (CommunicationRequests)."""
        q = sa.select(resources.c.resource, resources.c.transaction_id).where(
            resources.c.type == resource_type, resources.c.id == resource_id
        )
        with self.engine.connect() as c:
            row = c.execute(q).first()
        return (json.loads(row.resource), row.transaction_id) if row is not None else None

    def requests_of(self, transaction_id: str) -> list[str]:
        """Ids of the CommunicationRequests that created this transaction's document."""
        q = sa.select(resources.c.id).where(
            resources.c.transaction_id == transaction_id,
            resources.c.type == "CommunicationRequest",
        )
        with self.engine.connect() as c:
            return [r[0] for r in c.execute(q)]

    def tx_put_binary(self, c: Connection, content_type: str, data: bytes) -> dict[str, Any]:
        """Keep a Binary's bytes; returns the Binary resource without its data. Large bytes are
        written without a copy of them in the driver (engine/payload_write.py)."""
        binary_id = uuid.uuid4().hex
        row = {"id": binary_id, "content_type": content_type, "created_at": now(), "data": data}
        insert_row(c, binaries, row, "data")
        return {
            "resourceType": "Binary",
            "id": binary_id,
            "meta": server_meta(1),
            "contentType": content_type,
        }

    def get_binary(self, binary_id: str) -> tuple[str, bytes] | None:
        """The Binary's content type and bytes; large bytes are read without a second copy of
        them in memory (engine/payload_read.py), as a document's payload is."""
        with self.engine.connect() as c:
            row = c.execute(_BINARY, {"binary_id": binary_id}).first()
            if row is None:
                return None
            if row.small is not None:  # read with the rest: one round trip
                return row.content_type, bytes(row.small)
            try:
                data = read_large(c, binaries.c.data, binaries.c.id, binary_id, int(row.size))
            except NoResultFound:  # pruned between the two reads
                return None
        return row.content_type, data

    def binary_content_type(self, binary_id: str) -> str | None:
        """The Binary's content type, without reading its bytes (reference checks)."""
        q = sa.select(binaries.c.content_type).where(binaries.c.id == binary_id)
        with self.engine.connect() as c:
            return c.execute(q).scalar()


# A Binary's content type and size, and its bytes when they are small enough for a plain read.
_BINARY = sa.select(
    binaries.c.content_type,
    sa.func.length(binaries.c.data).label("size"),
    sa.case((sa.func.length(binaries.c.data) <= DIRECT_READ_BYTES, binaries.c.data)).label("small"),
).where(binaries.c.id == sa.bindparam("binary_id"))


def insert_resource(
    c: Connection, resource: dict[str, Any], transaction_id: str | None = None
) -> dict[str, Any]:
    out = {**resource, "id": uuid.uuid4().hex, "meta": server_meta(1, resource.get("meta"))}
    # Values as execute parameters: SQLAlchemy's statement cache would keep the first statement's.
    c.execute(
        resources.insert(),
        {
            "type": out["resourceType"],
            "id": out["id"],
            "resource": json.dumps(out),
            "created_at": now(),
            "transaction_id": transaction_id,
        },
    )
    return out
