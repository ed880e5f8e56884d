"""Transaction ids: unique, time-ordered, and at most 20 characters.

The id is also MSH-10 of every HL7 rendering (ST, 20 characters in v2.5), so it must fit there
unchanged: 12 hex digits of milliseconds since the epoch (good until the year 10889) followed by
8 hex digits of randomness. Time first keeps ids roughly sortable in logs and indexes; the store's
primary key catches the (2^-32 per millisecond) collision, and the caller draws again.
"""

from __future__ import annotations

import re
import secrets
import time

TRANSACTION_ID = re.compile(r"^[0-9a-f]{20}$")


def new_transaction_id() -> str:
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(4)}"


def is_transaction_id(value: str) -> bool:
    return bool(TRANSACTION_ID.fullmatch(value))
