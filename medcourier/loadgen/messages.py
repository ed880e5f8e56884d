"""What the load generator sends: HL7 v2 ADT^A01 and ORU^R01 messages, and a PDF of a chosen size.

Every message has its own MSH-10 (control id) made of a run prefix and a sequence number, so a
receiver that drops resent messages (same sender, same MSH-10) processes each one, and no two
runs collide. Each message also admits its own fictitious patient and visit, the way an admission
feed or a laboratory sends them: a receiver that keeps a directory does the same work a real feed
would cause. ``patients`` makes them cycle through a fixed set instead (updates, not creations).

Messages are returned as a list of byte strings to write one after the other: the part that
changes from one message to the next is small, and a large document (the OBX of an ORU) is built
once and written as is, never copied per message.
"""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass, field
from datetime import datetime

MAX_CONTROL_ID = 20
"""MSH-10 is 20 characters long in HL7 v2.5."""

_FAMILIES = ("MARTIN", "BERNARD", "DUBOIS", "THOMAS", "ROBERT", "RICHARD", "PETIT", "DURAND")
_GIVEN = (("Hélène", "F"), ("Zoé", "F"), ("Loïc", "M"), ("Jérôme", "M"), ("Anaïs", "F"))
_STREETS = ("12 rue de la Paix", "3 avenue Foch", "8 boulevard Voltaire", "27 quai de Saône")
_CITIES = (("Paris", "75002"), ("Lyon", "69002"), ("Lille", "59000"), ("Nantes", "44000"))

# Segments added in turn until an ADT reaches its size (then an OBX TX note pads the rest).
_FILLERS = (
    "OBX|{n}|NM|8302-2^Taille^LN||{a}|cm^cm^UCUM|||||F|||{ts}",
    "OBX|{n}|NM|29463-7^Poids^LN||{b}|kg^kg^UCUM|||||F|||{ts}",
    "AL1|{n}|DA|70618^Pénicilline^RXNORM|MO|Éruption cutanée|20190412",
    "OBX|{n}|NM|8310-5^Température^LN||37.{c}|Cel^°C^UCUM|||||F|||{ts}",
    "NK1|{n}|DUPONT^Paul|SPO^Conjoint^HL70063|5 rue des Lilas^^Lyon^^69003^FRA^H"
    "|0472000000^PRN^PH||C^Contact d'urgence^HL70131",
    "OBX|{n}|NM|8867-4^Fréquence cardiaque^LN||{d}|/min^/min^UCUM|||||F|||{ts}",
    "AL1|{n}|FA|227493005^Noix de cajou^SCT|SV|Œdème de Quincke|20150903",
    "DG1|{n}||I20.9^Angine de poitrine, sans précision^I10||{ts}|A",
    "OBX|{n}|NM|8480-6^Pression systolique^LN||1{e}|mm[Hg]^mmHg^UCUM|||||F|||{ts}",
    "NK1|{n}|DUPONT^Camille|CHD^Enfant^HL70063|||0600000000^PRN^CP",
)


def run_prefix() -> str:
    """A random prefix for this run's control ids (8 characters)."""
    return "LG" + secrets.token_hex(3).upper()


def control_id(prefix: str, seq: int) -> str:
    """The MSH-10 of message ``seq``: the run prefix and the number, at most 20 characters."""
    value = f"{prefix}{seq:06d}"
    if len(value) > MAX_CONTROL_ID:
        raise ValueError(f"control id {value!r} is longer than {MAX_CONTROL_ID} characters")
    return value


def pdf(size: int) -> bytes:
    """A PDF of exactly ``size`` bytes (one empty page, the rest a binary stream) when ``size``
    leaves room for the page, else just the header padded: enough for a receiver that sniffs the
    ``%PDF-`` signature, and incompressible like a real scanned document."""
    head = (
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"
        b"1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
        b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
        b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 595 842]>>endobj\n"
    )
    tail = b"trailer<</Root 1 0 R>>\n%%EOF\n"
    room = size - len(head) - len(tail)
    if room < 64:
        return (b"%PDF-1.4\n" + b"%" * max(0, size - 9))[: max(size, 9)]
    # the stream's Length has as many digits as needed; adjust once for them
    for digits in range(1, 12):
        body = room - len(b"4 0 obj<</Length >>stream\n\nendstream endobj\n") - digits
        if len(str(body)) == digits:
            break
    stream = b"4 0 obj<</Length %d>>stream\n" % body + os.urandom(body) + b"\nendstream endobj\n"
    return head + stream + tail


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S")


@dataclass
class _Person:
    ipp: str
    visit: str
    family: str
    given: str
    sex: str
    birth: str
    street: str
    city: str
    zip: str


def _person(prefix: str, seq: int) -> _Person:
    given, sex = _GIVEN[seq % len(_GIVEN)]
    city, zip_code = _CITIES[seq % len(_CITIES)]
    return _Person(
        ipp=f"{prefix}P{seq:06d}",
        visit=f"{prefix}V{seq:06d}",
        family=_FAMILIES[seq % len(_FAMILIES)],
        given=given,
        sex=sex,
        birth=f"19{40 + seq % 60:02d}{1 + seq % 12:02d}{1 + seq % 28:02d}",
        street=_STREETS[seq % len(_STREETS)],
        city=city,
        zip=zip_code,
    )


@dataclass
class MessageSource:
    """Builds message ``seq`` of a run; ``parts`` returns (control id, byte strings to write)."""

    kind: str
    """``adt`` or ``oru``."""
    payload_size: int
    """ADT: the size the message is padded to. ORU: the size of the PDF it carries."""
    facility: str = "LOADGEN"
    patients: int | None = None
    """How many patients (and visits) the messages cycle through; None: one per message."""
    prefix: str = field(default_factory=run_prefix)
    _document: bytes = b""

    def __post_init__(self) -> None:
        if self.kind not in ("adt", "oru"):
            raise ValueError(f"unknown message kind {self.kind!r} (adt or oru)")
        if self.payload_size < 1:
            raise ValueError("the payload size must be positive")
        if self.patients is not None and self.patients < 1:
            raise ValueError("the number of patients must be positive")
        if self.kind == "oru":
            data = base64.b64encode(pdf(self.payload_size))
            self._document = (
                b"OBX|1|ED|11502-2^Compte rendu de biologie^LN||^AP^PDF^Base64^"
                + data
                + b"||||||F|||"
                + _ts(datetime.now()).encode()
                + b"||10003999999^BIOLOGISTE^ANNE^^^DR^^^RPPS&1.2.250.1.71.4.2.1&ISO\r"
            )

    @property
    def label(self) -> str:
        return "ADT^A01" if self.kind == "adt" else "ORU^R01"

    def parts(self, seq: int, now: datetime | None = None) -> tuple[str, list[bytes]]:
        cid = control_id(self.prefix, seq)
        moment = _ts(now or datetime.now())
        person = _person(self.prefix, seq if self.patients is None else seq % self.patients)
        if self.kind == "adt":
            return cid, [self._adt(cid, moment, person, seq)]
        return cid, [self._oru_head(cid, moment, person), self._document]

    def size(self) -> int:
        """The size in bytes of one message (they differ by a few bytes at most)."""
        return sum(len(part) for part in self.parts(0)[1])

    # -- the messages ------------------------------------------------------------------------

    def _msh(self, cid: str, moment: str, kind: str) -> str:
        return (
            f"MSH|^~\\&|LOADGEN|{self.facility}|MEDCOURIER|MC|{moment}||{kind}|{cid}|P|2.5"
            "|||||FRA|UNICODE UTF-8"
        )

    def _pid(self, p: _Person) -> str:
        authority = f"{self.facility}&1.2.250.1.999.1&ISO"
        return (
            f"PID|1||{p.ipp}^^^{authority}^PI||{p.family}^{p.given}^^^^^L~{p.family}^{p.given}"
            f"^^^^^D||{p.birth}|{p.sex}|||{p.street}^^{p.city}^^{p.zip}^FRA^H"
            "||0102030405^PRN^PH~0607080910^PRN^CP|||M|||||||||||FRA"
        )

    def _pv1(self, p: _Person, moment: str) -> str:
        authority = f"{self.facility}&1.2.250.1.999.2&ISO"
        return (
            f"PV1|1|I|CARDIO^101^1^{self.facility}||||10003123456^CARDIO^ANNE^^^DR"
            f"|||CAR||||1|||10003123456^CARDIO^ANNE^^^DR|IN|{p.visit}^^^{authority}^VN"
            + "|" * 25
            + moment
        )

    def _adt(self, cid: str, moment: str, p: _Person, seq: int) -> bytes:
        segments = [
            self._msh(cid, moment, "ADT^A01^ADT_A01"),
            f"EVN|A01|{moment}|||OP{seq % 97:03d}^ACCUEIL^CLAIRE",
            self._pid(p),
            f"PD1|||{self.facility}^^{self.facility}"
            "|10003123456^MEDECIN^TRAITANT^^^DR^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO",
            self._pv1(p, moment),
            "PV2|||R07.4^Douleur thoracique, sans précision^I10",
        ]
        values = {
            "a": 150 + seq % 50,
            "b": 50 + seq % 50,
            "c": seq % 10,
            "d": 60 + seq % 40,
            "e": 10 + seq % 50,
            "ts": moment,
        }
        size = sum(len(s.encode()) + 1 for s in segments)
        # room for the closing note (with a two-digit set id and at least one character)
        note_overhead = len("OBX|99|TX|48767-8^Commentaire^LN||x||||||F\r")
        counts: dict[str, int] = {}
        for template in _FILLERS * 4:
            name = template[:3]
            segment = template.format(n=counts.get(name, 0) + 1, **values)
            grown = size + len(segment.encode()) + 1
            if grown + note_overhead > self.payload_size:
                break
            segments.append(segment)
            counts[name] = counts.get(name, 0) + 1
            size = grown
        head = f"OBX|{counts.get('OBX', 0) + 1}|TX|48767-8^Commentaire^LN||"
        tail = "||||||F"
        room = self.payload_size - size - len(head) - len(tail) - 1
        if room > 0:
            sentence = "Patient admis pour bilan, surveillance et suite de prise en charge. "
            segments.append(head + (sentence * (room // len(sentence) + 1))[:room] + tail)
        return ("\r".join(segments) + "\r").encode()

    def _oru_head(self, cid: str, moment: str, p: _Person) -> bytes:
        segments = [
            self._msh(cid, moment, "ORU^R01^ORU_R01"),
            self._pid(p),
            self._pv1(p, moment),
            f"ORC|RE|{cid}|{cid}",
            f"OBR|1|{cid}|{cid}|11502-2^Compte rendu de biologie^LN|||{moment}",
        ]
        return ("\r".join(segments) + "\r").encode()
