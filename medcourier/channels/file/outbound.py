"""Write each rendering to a folder, atomically, never replacing a file already there.

How a file appears
------------------
The data is written to ``.<name>.tmp`` in the target folder (hidden, so a poller that lists
``*.hpr`` or ``*`` without dot files never picks it up), fsynced, then given its final name with
``link()``, which fails instead of replacing an existing file, and the folder is fsynced so the
name survives a power cut. Only then is the optional ``<name>.ok`` created: a receiver that waits
for the ``.ok`` never reads an incomplete or not yet durable file. On filesystems without hard
links (some network shares) the final step falls back to ``rename()`` after an existence check,
which leaves a tiny window in which a concurrent writer of the same name could be replaced.

When the name is taken
----------------------
Names usually carry the transaction id, so a taken name mostly means this very message was
written before (a retry after a crash between the write and the status update). The existing file
is compared with the new data: identical bytes are an idempotent success (and a missing ``.ok`` is
completed); different bytes get the next free ``name-1.ext``, ``name-2.ext``…

Failures
--------
A missing folder, a full disk, a permission problem or any other ``OSError`` is a
:meth:`DeliveryResult.retry` with the path and the system's reason: the route is held until
someone fixes the folder, and nothing is lost. A missing folder is not created unless
``create_directory`` says so, because the usual cause is an unmounted share, and writing into the
empty mount point would deliver documents where nobody looks. A file name that cannot exist
(too long, bad characters from the format) is rejected: retrying the same name cannot help.

Encoding
--------
The connector writes ``Rendered.data`` byte for byte. The character set (ISO-8859-1 for HPRIM,
UTF-8 for JSON) is chosen by the route's format, which knows what the bytes mean.

Formats that deliver several files (HPRIM with companion files) will hand them over together;
:func:`_place` already writes one file with all the guarantees above, and companions would be
placed before the main file, the ``.ok`` last.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import string
from collections.abc import Iterator
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from medcourier.engine.model import DeliveryResult, Rendered
from medcourier.engine.txid import is_transaction_id

FILENAME_FIELDS = frozenset({"hint", "stem", "suffix", "transaction_id", "message_id", "created"})
"""Fields a ``filename`` template may use (see :class:`FileOptions`)."""

OK_NAME_FIELDS = frozenset({"name", "stem"})

MAX_SUFFIX = 999
"""How many ``-N`` variants of a taken name are tried before the delivery is held."""

_NAME_MAX = 255  # NAME_MAX of every filesystem a hospital share is likely to use
_MAX_NAME_BYTES = _NAME_MAX - len("..tmp")  # room for the temporary name
_CHUNK = 1024 * 1024
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK}
_NO_DIR_FSYNC = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}
_SAMPLE_TIME = datetime(2024, 1, 31, 23, 59, 58, tzinfo=UTC)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # never write through a symlink planted in the folder
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_UNSAFE = {"/", "\\", "\x00"}


class FileOptions(BaseModel):
    """The ``deliver:`` block of a route using ``connector: file``.

    ``filename`` is a Python format string. Its fields:

    - ``hint``: the format's own file name (``<transaction id>.hl7``, ``….json``…), the default;
    - ``stem`` and ``suffix``: ``hint`` without and with only its extension (``.hl7``);
    - ``transaction_id`` / ``message_id``: the rendering's message id (the transaction id);
    - ``created``: when the document was received (read from the transaction id, so a retry
      gives the same name), in ``timezone``; use a date format: ``{created:%Y%m%d%H%M%S}``.

    ``ok_name`` names the companion file from the final data file's ``name`` (after any ``-N``
    suffix) and its ``stem``: ``{name}.ok`` (``CR.hpr.ok``) or ``{stem}.ok`` (``CR.ok``).
    """

    model_config = ConfigDict(extra="forbid")

    connector: Literal["file"] = "file"
    directory: Path
    filename: str = Field("{hint}", min_length=1)
    ok_file: bool = Field(False, description="write <name>.ok after the data file")
    ok_name: str = Field("{name}.ok", min_length=1)
    create_directory: bool = Field(
        False, description="create a missing folder (off: a missing mount must not be filled)"
    )
    timezone: str = Field("UTC", description="IANA zone for {created}, e.g. Europe/Paris")

    @field_validator("filename")
    @classmethod
    def _filename_template(cls, value: str) -> str:
        _check_template(value, FILENAME_FIELDS, _sample_fields())
        return value

    @field_validator("ok_name")
    @classmethod
    def _ok_name_template(cls, value: str) -> str:
        sample = {"name": "CR.hpr", "stem": "CR"}
        _check_template(value, OK_NAME_FIELDS, sample)
        if value.format_map(sample) == sample["name"]:
            raise ValueError("must differ from the data file's name (e.g. {name}.ok)")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        _zone(value)
        return value


class FileSender:
    """Writes renderings into ``options.directory``; the blocking work runs on a thread.

    Deliveries on one sender are serialized so two files never race for the same name here.
    """

    def __init__(self, options: FileOptions) -> None:
        self.options = options
        self._zone = _zone(options.timezone)
        self._lock = asyncio.Lock()

    async def deliver(self, rendered: Rendered) -> DeliveryResult:
        """Write one rendering; never raises for filesystem trouble (see the module doc)."""
        async with self._lock:
            return await asyncio.to_thread(self._deliver, rendered)

    async def aclose(self) -> None:
        """Nothing to close: every delivery opens and closes its own files."""

    def _deliver(self, rendered: Rendered) -> DeliveryResult:
        directory = self.options.directory
        try:
            name = self.file_name(rendered)
        except ValueError as exc:
            return DeliveryResult.rejected(f"cannot name the file: {exc}")
        problem = _directory_problem(directory, self.options.create_directory)
        if problem is not None:
            return DeliveryResult.retry(problem)
        try:
            # Companions first: once the main file (and its .ok) appear, what it names is there.
            for companion, data in rendered.companions:
                _check_name(companion)
                placed, _ = _place(directory, companion, data)
                if placed.name != companion:
                    placed.unlink()
                    return DeliveryResult.rejected(
                        f"{companion} already exists with other content; the main file names "
                        "it, so it cannot be renamed"
                    )
            path, duplicate = _place(directory, name, rendered.data)
        except _NameTooLong as exc:
            return DeliveryResult.rejected(str(exc))
        except _AllTaken as exc:
            return DeliveryResult.retry(str(exc))
        except OSError as exc:
            return DeliveryResult.retry(_describe(exc, directory / name))
        if self.options.ok_file:
            ok_path = directory / self._ok_name(path.name)
            try:
                _touch(ok_path)
                _fsync_directory(directory)
            except OSError as exc:
                # The data is in place; the retry finds it identical and completes the .ok.
                return DeliveryResult.retry(f"{path.name} written but {_describe(exc, ok_path)}")
        if duplicate:
            return DeliveryResult.accepted(
                f"already written as {path}", path=str(path), duplicate=True
            )
        return DeliveryResult.accepted(
            f"written to {path}", path=str(path), size=rendered.size, duplicate=False
        )

    def file_name(self, rendered: Rendered) -> str:
        """The file name ``filename`` gives for ``rendered`` (``ValueError`` if unusable)."""
        hint = _clean(rendered.filename_hint) or _clean(rendered.message_id) or "message"
        stem, suffix = _split(hint)
        fields = {
            "hint": hint,
            "stem": stem,
            "suffix": suffix,
            "transaction_id": _clean(rendered.message_id),
            "message_id": _clean(rendered.message_id),
            "created": _created(rendered.message_id).astimezone(self._zone),
        }
        name = self.options.filename.format_map(fields)
        _check_name(name)
        return name

    def _ok_name(self, name: str) -> str:
        return self.options.ok_name.format_map({"name": name, "stem": _split(name)[0]})


# --- placing one file ---------------------------------------------------------------------------


class _NameTooLong(Exception):
    pass


class _AllTaken(Exception):
    pass


def _place(directory: Path, name: str, data: bytes) -> tuple[Path, bool]:
    """Give ``data`` a name in ``directory`` without replacing anything.

    :return: the final path and whether an identical file was already there.
    :raises OSError: the filesystem refused (full, read-only, permissions...).
    """
    candidates = _candidates(name)
    candidate = next(candidates)
    # Most retries find their own file: settle that before writing anything.
    while True:
        found = _compare(directory / candidate, data)
        if found is None:
            break
        if found:
            return directory / candidate, True
        candidate = _next_candidate(candidates, name)
    temp = directory / f".{name}.tmp"
    _write_temp(temp, data)
    try:
        while True:
            target = directory / candidate
            if _link_no_replace(temp, target):
                _fsync_directory(directory)
                return target, False
            found = _compare(target, data)  # someone took the name meanwhile
            if found:
                return target, True
            candidate = _next_candidate(candidates, name)
    finally:
        _unlink_quietly(temp)


def _candidates(name: str) -> Iterator[str]:
    yield name
    stem, suffix = _split(name)
    for n in range(1, MAX_SUFFIX + 1):
        yield f"{stem}-{n}{suffix}"


def _next_candidate(candidates: Iterator[str], name: str) -> str:
    candidate = next(candidates, None)
    if candidate is None:
        raise _AllTaken(f"{name} and {MAX_SUFFIX} numbered variants all exist with other content")
    if len(os.fsencode(candidate)) > _NAME_MAX:
        raise _NameTooLong(f"no room for a numbered variant of {name} within {_NAME_MAX} bytes")
    return candidate


def _compare(path: Path, data: bytes) -> bool | None:
    """None when ``path`` does not exist, else whether it holds exactly ``data``."""
    try:
        # O_NONBLOCK: a FIFO under our name must not hang the delivery thread.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink under our name: taken, and not by us
            return False
        if exc.errno == errno.ENAMETOOLONG:
            raise _NameTooLong(f"file name too long for the filesystem: {path.name}") from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != len(data):
            return False
        view = memoryview(data)
        offset = 0
        while offset < len(view):
            chunk = os.read(fd, _CHUNK)
            if not chunk or chunk != view[offset : offset + len(chunk)]:
                return False
            offset += len(chunk)
        return not os.read(fd, 1)
    finally:
        os.close(fd)


def _write_temp(temp: Path, data: bytes) -> None:
    """Write and fsync ``data`` to a fresh ``temp`` (a stale one from a crash is replaced)."""
    _unlink_quietly(temp, missing_only=False)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise _NameTooLong(f"file name too long for the filesystem: {temp.name}") from exc
        raise
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view[:_CHUNK])
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(temp)
        raise
    os.close(fd)


def _link_no_replace(temp: Path, target: Path) -> bool:
    """Give ``temp``'s content the name ``target``; False if ``target`` exists."""
    try:
        os.link(temp, target)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
    # No hard links here: rename() replaces silently, so look first (a small race, see above).
    if os.path.lexists(target):
        return False
    os.rename(temp, target)
    return True


def _touch(path: Path) -> None:
    """Create an empty ``path`` if it does not exist (the ``.ok`` marker)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o666)
    except FileExistsError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    """Make the folder's entries durable; a no-op where the filesystem cannot do it."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC
    try:
        fd = os.open(directory, flags)
    except OSError as exc:
        if exc.errno in _NO_DIR_FSYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


def _unlink_quietly(path: Path, missing_only: bool = True) -> None:
    """Remove ``path``; ignore its absence, and any error unless ``missing_only`` is False."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        if not missing_only:
            raise


def _directory_problem(directory: Path, create: bool) -> str | None:
    try:
        if directory.is_dir():
            return None
        if directory.exists() or directory.is_symlink():
            return f"{directory} is not a directory"
        if not create:
            return f"directory {directory} does not exist (not mounted?)"
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _describe(exc, directory, "cannot create")
    return None


# --- names --------------------------------------------------------------------------------------


def _clean(value: str) -> str:
    """A value safe inside a file name: no separators, NUL or control characters."""
    return "".join("_" if c in _UNSAFE or ord(c) < 32 or ord(c) == 127 else c for c in value)


def _split(name: str) -> tuple[str, str]:
    """``"a.b.hl7"`` → ``("a.b", ".hl7")``; a name without extension has an empty suffix."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return name, ""
    return stem, f".{ext}"


def _check_name(name: str) -> None:
    if not name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a file name")
    if name.startswith("."):
        raise ValueError(f"{name!r} starts with a dot (hidden, like the temporary files)")
    if any(c in _UNSAFE or ord(c) < 32 for c in name):
        raise ValueError(f"{name!r} holds a path separator or a control character")
    if len(os.fsencode(name)) > _MAX_NAME_BYTES:
        raise ValueError(f"{name[:40]!r}… is longer than {_MAX_NAME_BYTES} bytes")


def _created(message_id: str) -> datetime:
    """When the document was received: transaction ids start with epoch milliseconds.

    A message id that is not a transaction id (a format's own numbering) gives the current
    time, so such names differ between retries.
    """
    if is_transaction_id(message_id):
        return datetime.fromtimestamp(int(message_id[:12], 16) / 1000, UTC)
    return datetime.now(UTC)


def _zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r} (an IANA name like Europe/Paris)") from exc


def _sample_fields() -> dict[str, Any]:
    return {
        "hint": "0190f3a2b4c5d6e7f8a9.hl7",
        "stem": "0190f3a2b4c5d6e7f8a9",
        "suffix": ".hl7",
        "transaction_id": "0190f3a2b4c5d6e7f8a9",
        "message_id": "0190f3a2b4c5d6e7f8a9",
        "created": _SAMPLE_TIME,
    }


def _check_template(template: str, allowed: frozenset[str], sample: dict[str, Any]) -> None:
    """Refuse unknown fields, attribute/index access and specs that fail, at config load."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a valid format string: {exc}") from exc
    for literal, field, _spec, _conversion in parsed:
        if any(c in _UNSAFE for c in literal):
            raise ValueError("a file name, not a path: no '/' or '\\' (use directory)")
        if field is None:
            continue
        if field not in allowed:
            known = ", ".join(sorted(allowed))
            hint = " ({route} is not passed to connectors yet)" if field == "route" else ""
            raise ValueError(f"unknown field {{{field}}}{hint}; use {known}")
    try:
        name = template.format_map(sample)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"cannot be formatted: {exc}") from exc
    _check_name(name)


def _describe(exc: OSError, path: Path, what: str = "cannot write") -> str:
    """``cannot write PATH: No space left on device (ENOSPC)``."""
    code = errno.errorcode.get(exc.errno or 0, "")
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = exc.filename if exc.filename is not None else path
    return f"{what} {where}: {reason}" + (f" ({code})" if code else "")
