"""JSON and JSON Lines files that a crash never leaves half written, and a tolerant JSONL reader.

Whole files (JSON, JSONL, or any bytes: :func:`write_bytes`) are written to a temporary file
beside the target, flushed to disk, then renamed over it: a reader sees the old file or the new
one, never a part; a failure (a full disk) names the target. An appended JSONL line can still be
cut off by a crash or a full disk; :func:`read_jsonl` skips such a line (and any other that is
not JSON) with one warning naming the file, instead of failing.
"""

import json
import logging
import os
import secrets
from collections.abc import Iterable
from typing import Any

_log = logging.getLogger(__name__)


def _write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file; an OSError (a full disk, say) names
    ``path``, which keeps its old content."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{secrets.token_hex(8)}")
    try:
        # Mode 0o666 less the umask (applied by the kernel), as open() would give the file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise OSError(error.errno, error.strerror, path) from error
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        os.unlink(tmp)
        raise OSError(error.errno, error.strerror, path) from error
    except BaseException:
        os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path``, atomically."""
    _write_atomically(path, data)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Writes ``payload`` to ``path`` as indented JSON, atomically."""
    _write_atomically(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Writes ``records`` to ``path``, one JSON object per line, atomically."""
    _write_atomically(path, "".join(json.dumps(record) + "\n" for record in records))


def read_json(path: str | os.PathLike) -> Any:
    """The value a JSON file holds; ValueError naming the file when it is not JSON."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{os.fspath(path)} is not valid JSON ({error}).") from error


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON Lines file; lines that are not JSON objects (such as a last line cut
    off by a crash) are skipped, with one warning naming the file and the lines."""
    records, skipped = [], []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped.append(number)
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        _log.warning(
            "%s: skipped %d line(s) that are not JSON records (line %s), e.g. cut off by a crash.",
            os.fspath(path),
            len(skipped),
            shown,
        )
    return records
