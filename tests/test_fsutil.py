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
