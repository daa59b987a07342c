"""Synthetic Debian packages for the corpus builders' tests: an ``ar`` archive whose ``data.tar.xz`` holds the
given files, as ``apt-get download`` delivers a package."""

from __future__ import annotations

import io
import tarfile


def tar_xz(files: dict[str, bytes], prefix: str) -> bytes:
    """An xz tarball of ``{path: bytes}``, every path under ``prefix``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(f"{prefix}/{path}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def deb(data_files: dict[str, bytes]) -> bytes:
    """A Debian package whose data.tar.xz holds ``data_files`` (paths relative to the root)."""
    out = bytearray(b"!<arch>\n")
    members = (("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"control": b"x"}, ".")), ("data.tar.xz", tar_xz(data_files, ".")))
    for name, payload in members:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n".encode()
        assert len(header) == 60
        out += header + payload + (b"\n" if len(payload) % 2 else b"")
    return bytes(out)
