"""Tarballs laid out as argoexec writes them (util/archive TarGzToWriter): a file as one member named after its
basename; a directory as its basename, then every entry below it as `basename/relative/path`."""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Mapping

__all__ = ["argo_tgz", "extract"]


def argo_tgz(path: str, files: Mapping[str, bytes] | bytes) -> bytes:
    """`files` as bytes: `path` is a file; as a mapping (relative name → bytes): `path` is a directory."""
    base = posixpath.basename(path.rstrip("/"))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        if isinstance(files, bytes):
            _add_file(archive, base, files)
        else:
            _add_dir(archive, base)
            for name in sorted(files):
                parts = name.split("/")
                for depth in range(1, len(parts)):
                    directory = posixpath.join(base, *parts[:depth])
                    if directory not in archive.getnames():
                        _add_dir(archive, directory)
                _add_file(archive, posixpath.join(base, name), files[name])
    return buffer.getvalue()


def extract(data: bytes) -> dict[str, bytes]:
    """Member name → bytes of the regular files in a .tgz."""
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive.getmembers():
            if member.isreg():
                extracted = archive.extractfile(member)
                assert extracted is not None
                found[member.name] = extracted.read()
    return found


def _add_file(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 1_700_000_000
    archive.addfile(info, io.BytesIO(data))


def _add_dir(archive: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.mtime = 1_700_000_000
    archive.addfile(info)
