"""Durable-write helpers: copies are exact whatever the source's state."""

from __future__ import annotations

import io
import os

from studyvault.fsutil import copy_plain, copy_stream


def test_kernel_copy_of_a_fresh_file_is_exact(tmp_path):
    data = os.urandom(3_000_001)
    (tmp_path / "a").write_bytes(data)
    with open(tmp_path / "a", "rb") as src, open(tmp_path / "b", "wb") as out:
        assert copy_plain(src, out) == len(data)
    assert (tmp_path / "b").read_bytes() == data


def test_copy_of_a_partly_read_file_copies_the_rest_exactly(tmp_path):
    data = os.urandom(3_000_001)
    (tmp_path / "a").write_bytes(data)
    with open(tmp_path / "a", "rb") as src, open(tmp_path / "b", "wb") as out:
        src.read(10)  # the reader has read ahead: its descriptor is past position 10
        copy_plain(src, out)
    assert (tmp_path / "b").read_bytes() == data[10:]


def test_copy_into_a_stream_without_a_descriptor(tmp_path):
    data = os.urandom(2_500_000)
    (tmp_path / "a").write_bytes(data)
    out = io.BytesIO()
    with open(tmp_path / "a", "rb") as src:
        copy_plain(src, out)
    assert out.getvalue() == data


def test_copy_stream_hashes_what_it_copies(tmp_path):
    import hashlib

    data = os.urandom(5_000_000)
    out = io.BytesIO()
    size, digest = copy_stream(io.BytesIO(data), out)
    assert size == len(data) and out.getvalue() == data
    assert digest == hashlib.sha256(data).hexdigest()


def test_copy_stream_of_a_large_file_is_copied_in_the_kernel_and_hashed(tmp_path, monkeypatch):
    import hashlib

    from studyvault import fsutil

    data = os.urandom(3_000_001)
    (tmp_path / "a").write_bytes(data)
    kernel: list[int] = []
    plain = fsutil.copy_plain
    monkeypatch.setattr(fsutil, "copy_plain", lambda s, o: kernel.append(1) or plain(s, o))
    with open(tmp_path / "a", "rb") as src, open(tmp_path / "b", "wb") as out:
        size, digest = copy_stream(src, out)
    assert kernel == [1]
    assert size == len(data) and (tmp_path / "b").read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()


def test_a_file_changing_while_it_is_copied_is_copied_again(tmp_path, monkeypatch):
    """The kernel copy and the hash read the file separately: when it changed between
    them, the copy is redone through the hashing loop, so the SHA-256 returned is that
    of the bytes written."""
    import hashlib

    from studyvault import fsutil

    source = tmp_path / "a"
    source.write_bytes(os.urandom(2_000_000))
    plain = fsutil.copy_plain

    def copy_then_append(src, out):
        copied = plain(src, out)
        with open(source, "ab") as more:  # a device still writing the file
            more.write(b"late bytes")
        return copied

    monkeypatch.setattr(fsutil, "copy_plain", copy_then_append)
    with open(source, "rb") as src, open(tmp_path / "b", "wb") as out:
        size, digest = copy_stream(src, out)
    written = (tmp_path / "b").read_bytes()
    assert written == source.read_bytes() and size == len(written) == 2_000_010
    assert digest == hashlib.sha256(written).hexdigest()
