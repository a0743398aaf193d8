"""Atomic writes of files and directories: the helpers every durable file in colaflow goes through."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None] | bytes) -> Path:
    """Write `path` through a sibling temp file and `os.replace`: readers see the old or the new file.

    `write` is the bytes to write, or a function that writes the file whose name it is given.
    No fsync: atomic against a killed process, not a power cut (the peer keeps what was acknowledged).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        if isinstance(write, (bytes, bytearray, memoryview)):
            with os.fdopen(fd, "wb") as f:
                f.write(write)
        else:
            os.close(fd)
            write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory aside, then swap it in: a failure leaves the old one (or none) in place.

    An existing directory is replaced only when each of its entries has a namesake in the new one
    (an earlier write of the same thing): anything else there would be lost, so that is refused.
    """
    path = Path(os.path.abspath(path))
    cwd = Path.cwd()
    if path == cwd or path in cwd.parents:
        raise FileExistsError(f"{path} is the current directory or holds it: write into a new directory")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file: give a directory's path (new, or an earlier export)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # as a plain mkdir would make it, not mkdtemp's 0700
        if path.exists():
            other = sorted(set(os.listdir(path)) - set(os.listdir(tmp)))
            if other:
                raise FileExistsError(f"{path} holds {', '.join(other[:5])}{' ...' if len(other) > 5 else ''}, "
                                      "which this write would delete: give a new directory (or empty it)")
            old = path.with_name(f".{path.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            path.rename(old)
            try:
                tmp.rename(path)
            except BaseException:
                old.rename(path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022
