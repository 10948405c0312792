"""Files that are either whole or absent: ``atomic_write`` is the one way mgpu writes a result.

A temporary file in the same folder (so the rename cannot cross file systems), fsync, rename over the
target, fsync of the folder. A crash or a full disk mid-write leaves the previous file intact and no
temporary file behind. The new file gets the permissions a plain ``open`` would give (umask applied).

    atomic_write(path, lambda f: torch.save(state, f))
    atomic_write(path, lambda f: np.save(f, array))
    write_json(path, {"key": 1})
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call write(f) on a binary file that becomes `path` only once it is complete and on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it 0600; a result is as readable as any file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """data as indented JSON with a final newline, atomically."""
    text = (json.dumps(data, indent=2) + "\n").encode()
    return atomic_write(path, lambda f: f.write(text))
