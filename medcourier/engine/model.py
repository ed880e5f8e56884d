"""The objects that travel between the core and the plugins.

They are plain frozen dataclasses rather than pydantic models: they are built once per message
on the hot path and never validated again (inputs are validated where they enter the engine).
``Rendered`` is an immutable class of its own, so that a large rendering can stream (see it).
"""

from __future__ import annotations

import binascii
import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, TypeAlias

from medcourier.engine.buffers import presized_buffer


class Status(enum.StrEnum):
    """The five delivery statuses of the Lifen contract (seed 000), used verbatim in FHIR."""

    PREPARATION = "preparation"
    IN_PROGRESS = "in-progress"
    COMPLETED = "completed"
    ENTERED_IN_ERROR = "entered-in-error"
    UNKNOWN = "unknown"

    @property
    def is_final(self) -> bool:
        return self in (Status.COMPLETED, Status.ENTERED_IN_ERROR)


@dataclass(frozen=True)
class Document:
    """One clinical document to deliver, with everything a format needs to render it.

    ``patient`` and ``encounter`` are the FHIR R4 resources (JSON dicts) of the directory as they
    were when the worker picked the document up, so a format reads identifiers, names and the
    visit exactly as the sender or the hospital's ADT recorded them.
    """

    transaction_id: str
    created_at: datetime
    content_type: str
    document_type: str
    title: str
    payload: bytes
    patient: dict[str, Any]
    encounter: dict[str, Any] | None = None
    sender_identifier: str | None = None
    sender_application: str = "medcourier"


@dataclass(frozen=True)
class Issue:
    """A validation finding, carrying what the inbound channel should answer."""

    message: str
    severity: str = "error"
    http_status: int = 422
    location: str | None = None


BASE64_SLICE = 768 * 1024
"""Payload bytes a :class:`Base64Part` encodes at a time: a multiple of 3, so the slices' Base64
texts join without padding in between, and 1 MiB of text each, the MLLP client's write slice."""


@dataclass(frozen=True, slots=True)
class Base64Part:
    """The Base64 text of ``source``, produced a slice at a time whenever it is read.

    A 50 MB PDF is 67 MB of Base64: a rendering that holds the text whole holds the payload too
    (it came from the store), more than twice the document. Holding the payload alone and
    encoding it slice by slice as it goes out keeps one copy; the Base64 of 3-byte-aligned
    slices, concatenated, is exactly the Base64 of the whole (no line breaks, ``=`` padding only
    at the very end). Reading it again (a retried delivery) encodes it again, which costs about
    a millisecond per megabyte, far less than a retry waits.

    The text holds only ``A-Z a-z 0-9 + / =``: no HL7 delimiter, no MLLP block character.
    """

    source: bytes

    def __len__(self) -> int:
        return 4 * -(-len(self.source) // 3)

    def chunks(self) -> Iterator[bytes]:
        """The Base64 text in pieces of at most 1 MiB (4/3 of :data:`BASE64_SLICE`)."""
        view = memoryview(self.source)
        for start in range(0, len(view), BASE64_SLICE):
            yield binascii.b2a_base64(view[start : start + BASE64_SLICE], newline=False)


Part: TypeAlias = bytes | Base64Part
"""One piece of a streamed rendering: bytes as they are, or a payload's Base64 made on demand."""


class Rendered:
    """A document rendered for one destination.

    ``companions`` are files that must be delivered beside the main one, under exactly these
    names (an HPRIM file names its PDF in an OBX of type FIC): connectors that cannot deliver
    them refuse the rendering rather than drop them.

    Most renderings are built whole: ``Rendered(data, media_type, filename_hint, message_id)``.
    A format may instead give its rendering as ordered parts (:meth:`from_parts`), some of them
    produced only when read (:class:`Base64Part`), so that a large document is never whole in
    memory as text beside its payload. A connector that can write as it goes (MLLP) reads
    :meth:`chunks`; ``data`` still gives the whole message to those that need it (file, HTTP,
    a stored rendering). The first read of ``data`` builds it once and keeps it in place of the
    parts, so the payload the parts held is released and a second read costs nothing.

    It is immutable like the frozen dataclass it replaces (mypy enforces the ``Final``
    attributes). It is not a dataclass any more because ``data`` of a streamed rendering is
    computed, and its ``repr`` names the sizes only, never the content (patient data).
    """

    __slots__ = ("_data", "_parts", "companions", "filename_hint", "media_type", "message_id")

    def __init__(
        self,
        data: bytes,
        media_type: str,
        filename_hint: str,
        message_id: str,
        companions: tuple[tuple[str, bytes], ...] = (),
    ) -> None:
        self._data: bytes | None = data
        self._parts: tuple[Part, ...] = (data,)
        self.media_type: Final = media_type
        self.filename_hint: Final = filename_hint
        self.message_id: Final = message_id
        self.companions: Final = companions

    @classmethod
    def from_parts(
        cls,
        parts: Iterable[Part],
        media_type: str,
        filename_hint: str,
        message_id: str,
        companions: tuple[tuple[str, bytes], ...] = (),
    ) -> Rendered:
        """A rendering whose bytes are ``parts`` one after the other, built only if asked."""
        rendered = cls(b"", media_type, filename_hint, message_id, companions)
        rendered._data = None
        rendered._parts = tuple(parts)
        return rendered

    @property
    def streamed(self) -> bool:
        """True while the bytes exist only as parts (``data`` has not been read)."""
        return self._data is None

    @property
    def parts(self) -> tuple[Part, ...]:
        """The parts, in order; a rendering built whole is its one part."""
        return self._parts

    @property
    def size(self) -> int:
        """The length of ``data``, without building it."""
        if self._data is not None:
            return len(self._data)
        return sum(len(part) for part in self._parts)

    @property
    def data(self) -> bytes:
        """The whole rendering (built on the first read of a streamed one, then kept)."""
        if self._data is None:
            self._data = _join(self._parts, self.size)
            self._parts = (self._data,)
        return self._data

    def chunks(self) -> Iterator[bytes]:
        """The bytes in order, a part or a Base64 slice at a time; each call starts over."""
        for part in self._parts:
            if isinstance(part, bytes):
                yield part
            else:
                yield from part.chunks()

    def __eq__(self, other: object) -> bool:
        """Equal bytes and metadata, as the dataclass compared (so a streamed one is built)."""
        if not isinstance(other, Rendered):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"Rendered(media_type={self.media_type!r}, filename_hint={self.filename_hint!r}, "
            f"message_id={self.message_id!r}, size={self.size}, streamed={self.streamed}, "
            f"companions={len(self.companions)})"
        )

    def _key(self) -> tuple[bytes, str, str, str, tuple[tuple[str, bytes], ...]]:
        return (self.data, self.media_type, self.filename_hint, self.message_id, self.companions)


def _join(parts: Iterable[Part], size: int) -> bytes:
    """The parts as one bytes object of ``size`` bytes, written into a buffer made at that size,
    which becomes the result without a copy (engine/buffers.py): the result is the only whole
    copy, never a list of pieces beside it."""
    out = presized_buffer(size)
    for part in parts:
        if isinstance(part, bytes):
            out.write(part)
        else:
            for chunk in part.chunks():
                out.write(chunk)
    out.truncate()
    return out.getvalue()


class Outcome(enum.StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RETRY = "retry"


@dataclass(frozen=True)
class DeliveryResult:
    """What a destination said: accepted, rejected for good (with a reason), or try later."""

    outcome: Outcome
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def accepted(cls, reason: str | None = None, **detail: Any) -> DeliveryResult:
        return cls(Outcome.ACCEPTED, reason, detail)

    @classmethod
    def rejected(cls, reason: str, **detail: Any) -> DeliveryResult:
        return cls(Outcome.REJECTED, reason, detail)

    @classmethod
    def retry(cls, reason: str, **detail: Any) -> DeliveryResult:
        return cls(Outcome.RETRY, reason, detail)
