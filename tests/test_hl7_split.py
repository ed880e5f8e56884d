"""The HL7 v2 splitter of transforms/hl7v2/inbound.py against python-hl7's ``hl7.parse``.

``_Message`` splits messages itself (only ``str.split``, fields split when first read) instead of
building python-hl7's tree; ``_Message(text, python_hl7=True)`` still goes through ``hl7.parse``.
Both must give the same segments, fields, repetitions, components and subcomponents, the same
delimiters, and so the same readings (``parse_adt``, ``parse_document_message``) and the same
errors, over every message the tests and the load generator use, crafted edge cases and random
text.
"""

from __future__ import annotations

import ast
import base64
import functools
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hl7
import pytest

from medcourier.loadgen.messages import MessageSource
from medcourier.transforms.hl7v2 import inbound
from medcourier.transforms.hl7v2.inbound import (
    _encoding,
    _Message,
    parse_adt,
    parse_document_message,
)
from medcourier.transforms.hl7v2.oru import render
from tests import test_hl7v2_inbound as adt_tests
from tests.test_hl7v2_oru import PDF_PAYLOAD, make_document

TESTS = Path(__file__).parent
SEGMENT = re.compile(r"[A-Z][A-Z0-9]{2}\|")


def _normalized(text: str) -> str:
    """What ``_Message`` hands to either splitter."""
    text = text.lstrip("\ufeff").strip()
    return text.replace("\r\n", "\r").replace("\n", "\r") if "\n" in text else text


def _outcome(make: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("ok", make())
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc), getattr(exc, "location", None))


def _split(text: str, *, python_hl7: bool) -> tuple[Any, ...]:
    message = _Message(text, python_hl7=python_hl7)
    segments = [
        (s.name, s.sequence, [s.field(n) for n in range(s.field_count())]) for s in message.segments
    ]
    return message.esc, message.separators, message.sub_separator, segments


def _read(parse: Callable[[str], Any], text: str, *, python_hl7: bool) -> tuple[Any, ...]:
    with pytest.MonkeyPatch.context() as patch:
        if python_hl7:
            patch.setattr(inbound, "_Message", functools.partial(_Message, python_hl7=True))
        return _outcome(lambda: parse(text))


def assert_same(text: str, *, readings: bool = True) -> None:
    lean = _outcome(lambda: _split(text, python_hl7=False))
    reference = _outcome(lambda: _split(text, python_hl7=True))
    assert lean == reference, text
    if lean[0] == "ok":
        # The delimiters python-hl7's unescape is given are those of its own parse.
        parsed = hl7.parse(_normalized(text))
        assert _encoding(_normalized(text)) == (str(parsed.separators), str(parsed.esc))
    if readings:
        for parse in (parse_adt, parse_document_message):
            assert _read(parse, text, python_hl7=False) == _read(parse, text, python_hl7=True)


# --- the corpus ------------------------------------------------------------------------------


def _literals(path: Path) -> Iterator[str]:
    """The string literals of a module; an f-string with its replacement fields as ``1``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
            value = node.value
            yield value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        elif isinstance(node, ast.JoinedStr):
            yield "".join(
                str(part.value) if isinstance(part, ast.Constant) else "1" for part in node.values
            )


def _messages_in_tests() -> list[str]:
    """Every literal of the test modules holding an MSH, alone and followed by the segments
    written in the same module."""
    found: list[str] = []
    for path in sorted(TESTS.glob("test_*.py")):
        literals = list(_literals(path))
        segments = [s for s in literals if SEGMENT.match(s) and not s.startswith("MSH")]
        for literal in literals:
            if "MSH" in literal:
                text = literal[literal.index("MSH") :]
                found.append(text)
                if segments:
                    found.append("\r".join([text, *segments]))
    return found


def _built_messages() -> list[str]:
    """What the inbound tests' builders and the load generator make."""
    t = adt_tests
    messages = [
        t.message("A01", t.PID, t.PV1),
        t.message("A03", t.PID, t.PV1_DISCHARGED, evn6="20240120090500"),
        t.message("A08", t.PID, t.PV1_DISCHARGED),
        t.message("A28", t.PID),
        t.message("A40", t.PID, "MRG|IPP-9^^^HOSPA^PI~IPP-8"),
        t.message("A01", t.PID, t.PV1).replace("\r", "\r\n") + "\r\n",
        t.ORU_HEAD + "OBX|1|ED|11502-2^Bilan^LN||^AP^PDF^Base64^"
        f"{base64.b64encode(PDF_PAYLOAD).decode()}||||||F\r",
        t.ORU_HEAD + "OBX|1|RP|11502-2^Bilan^LN||https://pacs.example/doc/1^PACS^AP^PDF||||||F",
        render(make_document()).data.decode("utf-8"),
        render(make_document(encounter=None)).data.decode("utf-8"),
    ]
    for kind, size in (("adt", 2048), ("adt", 300), ("oru", 2000)):
        source = MessageSource(kind, size, patients=3)
        for seq in range(3):
            messages.append(b"".join(source.parts(seq)[1]).decode("utf-8"))
    return messages


HEAD = "MSH|^~\\&|APP|FAC|MEDCOURIER|MC|20240115103000||ADT^A28^ADT_A05|C-1|P|2.5"
ESCAPES = [
    r"D\F\UPONT\S\X\T\Y\R\Z\E\W",
    r"\XC3A9\\X41\\XE9\\X\\X4\\XZZ\ ",
    r"\H\bold\N\ \.br\ \.sp\ \.sp2\ \.ce\ \.in+4\ \.ti-2\ \.sk3\ \.fi\ \.nf\ ",
    r"A\\B\\\C\ lone\ ",
    r"\Cxxyy\ \Mxxyyzz\ \Zabc\ trailing\\",
    r"\X0D0A\ \X5C7C5E\ ",
]
EDGE_CASES = [
    "MSH|^~\\&",  # MSH-2 is the last field: python-hl7 reads it up to the end, less a character
    "MSH|^~\\&|",
    "MSH|^~\\&||",
    "MSH|^~\\&|A\rPID",  # a line with no delimiter is no segment
    "MSH|^~\\&\rPID|1||42",  # MSH-2 closed by the next segment's field separator
    "MSH||A|B",  # empty MSH-2: every delimiter defaults
    "MSH|^|A^B~C&D",  # short MSH-2: repetition, escape and subcomponent default
    "MSH|^~|A\\F\\B",
    "MSH|^~\\&#|APP|FAC",  # v2.7 truncation character, ignored
    "MSH#^~\\&#APP#FAC#MC#MC#20240115103000##ADT^A28#C-2#P#2.5\rPID#1##42^^^FAC^PI##DOE|X",
    "MSH|*!/%|PAM|HOSPA|||20240115103000||ADT*A28|1|P|2.5\r"
    "PID|1||42***HOSPA%1.2.3%ISO*PI!43***X*PI||O/S/BRIEN/E/*ANNE/T/X",
    HEAD + "\rEVN||20240115103500\rPID|1||42^^^FAC^PI||DOE^JOHN",
    HEAD + "\rPID|1||42^^^FAC&1.2.3&ISO^PI~~43^^^&&^PI~||DOE^JOHN^^^^^L~~^^^^^^D||||||||",
    HEAD + "\rPID|1||42||DOE^JOHN|||M|||^^^^^^^~&&&^|||||||||||||||||||||||\r\r\r",
    HEAD + "\rpid |1||42||Doe\r PV1 |1|I",  # segment names are stripped and upper-cased
    HEAD + "\rZZZ^X\rPID~Y|1||42||DOE\rPID^Z",  # names from the first repetition
    HEAD + '\rPID|1||42||""^""|""|""',  # explicit nulls
    HEAD + "\rPID|1||42||DOE\rMSH|^~\\&|SECOND\rBHS|^~\\&\rFHS*x*y|z\rMSH|^~\\&",
    HEAD + "\rPID|1||42||DOE\rMSH!a|b\rBHS",
    HEAD + "\rPID|1||42||DOE\rMSH|",  # a header segment that ends at its field separator
    "\ufeff" + HEAD + "\nPID|1||42||DOE\r\n\n",
    " \t" + HEAD + "\rPID|1||42||DOE \t\r\n",
    HEAD + "\rPID|1||42||Zoé^Hélène^^^^^L~李^小龍",
    *(HEAD + f"\rPID|1||42||{raw}^{raw}|||M|||{raw}^^{raw}" for raw in ESCAPES),
    "MSH|^~\\&|A|B\rOBX|1|ED|X||^AP^PDF^Base64^QU\\.br\\JD||||||F",
    # Delimiters that are not all distinct: python-hl7 splits these either way.
    "MSH|^^\\&|A^B~C&D\rPID|1||42",
    "MSH|^~\\^|A^B~C&D\rPID|1||42",
    "MSH|^~\\||A^B|C",
    "MSH\r^~\\&\rA",
    # Letters as delimiters (S is a subcomponent separator, so a line "MSH" splits, and fails
    # the same way).
    "MSH|^~\\S|A\rMSH",
    "MSH|^~\\S|A\rPID|1||42^^^FASC^PI||DSOE",
    "MSHM^~\\&MAMB",
]


@pytest.mark.parametrize("text", _built_messages())
def test_built_messages(text: str) -> None:
    assert_same(text)


def test_messages_written_in_the_tests() -> None:
    corpus = _messages_in_tests()
    assert len(corpus) > 50
    for text in corpus:
        assert_same(text)


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases(text: str) -> None:
    assert_same(text)


def test_random_text() -> None:
    """Random messages over delimiters, escape sequences, segment names and line ends."""
    rng = random.Random(20240607)
    pieces = [
        *"|^~\\&#*!%/",
        *"AbZ09 é",
        "\r",
        "\n",
        "\r\n",
        "MSH",
        "BHS",
        "FHS",
        "PID",
        "\\F\\",
        "\\X41\\",
        "\\.br\\",
        '""',
    ]
    for _ in range(3000):
        encoding = "".join(rng.choice("|^~\\&#*!%/AS\r") for _ in range(rng.randint(1, 7)))
        body = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        assert_same("MSH" + encoding + body, readings=rng.random() < 0.2)


def test_fields_are_split_when_read() -> None:
    message = _Message(adt_tests.message("A01", adt_tests.PID, adt_tests.PV1))
    pid = message.first("PID")
    assert pid is not None
    assert pid._fields[5] == adt_tests.PID5  # not split yet
    assert pid.value(5, 1, 1) == "D|UPONT^X&Y\\Z"
    official = [["D\\F\\UPONT\\S\\X\\T\\Y\\E\\Z"], ["Zoé"], ["Zoé Anaïs Hélène"], [""], ["Mme"]]
    assert pid.field(5) == [
        [*official, [""], ["L"]],
        [["MARTIN-LÉGER"], ["Zoé"], [""], [""], [""], [""], ["D"]],
    ]
    assert pid._fields[5] is pid.field(5)  # split once, then kept
    msh = message.msh
    assert [msh.value(n) for n in (1, 2, 3, 9)] == ["|", "^~\\&", "PAM", "ADT"]


@pytest.mark.parametrize("raw", ESCAPES)
def test_unescape_is_the_same_as_on_python_hl7s_parse(raw: str) -> None:
    """python-hl7's unescape reads only the delimiters of the message it is called on: the
    minimal python-hl7 message ``_Message`` makes for it answers as its whole parse did."""
    for text in (HEAD, "MSH|*!/%|PAM|HOSPA", "MSH#^~\\&#A"):
        for value in (raw, raw.replace("\\", "/")):
            message = _Message(text)
            ours = message.unescape(value)
            message._unescaper = hl7.parse(text)
            assert ours == message.unescape(value)
