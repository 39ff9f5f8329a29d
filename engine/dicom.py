"""Reading the header of a DICOM file: just enough to index it, never its pixel data.

A file is DICOM by its content, not its name: either the 128-byte preamble followed by
``DICM`` (PS3.10), or a bare data set without preamble that starts with a group 0x0002
(file meta) or 0x0008 element, in implicit or explicit VR, little or big endian.

Only the top-level elements up to (0020,0013) *Instance Number* are parsed, with
:func:`pydicom.filereader.data_element_generator` and ``specific_tags``: every attribute
of :class:`~studyvault.records.InstanceHeader` lives there, so for a well-formed file
reading stops long before pixel data, however large the file. A file whose elements are
out of order is read again up to its pixel data before it is declared incomplete.

Bad content never raises anything but :class:`~studyvault.errors.NotDicomError`, whose
message is one line naming the file and the reason. An unreadable file raises
:class:`OSError` carrying the file name.

.. warning:: UIDs are stored exactly as found (stripped of padding), even when they break
   PS3.5's rules -- longer than 64 characters, or characters other than digits and dots
   -- because real archives hold such files and refusing them would lose studies. A UID
   can therefore contain ``/``, ``..`` or control characters: layout code must never use
   a UID as a raw path component. Check it with :func:`is_valid_uid` and sanitise or
   hash it when that fails.
"""

from __future__ import annotations

import datetime
import io
import os
import re
import struct
import zlib
from collections.abc import Callable
from typing import BinaryIO

from pydicom.charset import convert_encodings, decode_bytes, default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.filereader import data_element_generator
from pydicom.valuerep import TEXT_VR_DELIMS

from .errors import NotDicomError
from .records import InstanceHeader

__all__ = ["is_valid_uid", "looks_like_dicom", "read_header", "read_header_bytes"]

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
MEDIA_STORAGE_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"  # a DICOMDIR

_PREFIX_LEN = 132  # 128-byte preamble + b"DICM"
_CHUNK = 16384  # read first; a header up to Instance Number is rarely longer
_MAX_INFLATED = 64 * 1024 * 1024  # a deflated header is at the start; bounds a zip bomb

# Tags read from the data set. (0008,0005) Specific Character Set is always added by
# pydicom. _LAST_TAG is the highest one: reading stops at the first element after it.
_CHARSET = 0x00080005
_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_STUDY_DATE = 0x00080020
_STUDY_TIME = 0x00080030
_ACCESSION_NUMBER = 0x00080050
_MODALITY = 0x00080060
_STUDY_DESCRIPTION = 0x00081030
_SERIES_DESCRIPTION = 0x0008103E
_PATIENT_NAME = 0x00100010
_PATIENT_ID = 0x00100020
_PATIENT_BIRTH_DATE = 0x00100030
_PATIENT_SEX = 0x00100040
_STUDY_INSTANCE_UID = 0x0020000D
_SERIES_INSTANCE_UID = 0x0020000E
_STUDY_ID = 0x00200010
_SERIES_NUMBER = 0x00200011
_INSTANCE_NUMBER = 0x00200013
_TAGS: list[int] = [
    _SOP_CLASS_UID,
    _SOP_INSTANCE_UID,
    _STUDY_DATE,
    _STUDY_TIME,
    _ACCESSION_NUMBER,
    _MODALITY,
    _STUDY_DESCRIPTION,
    _SERIES_DESCRIPTION,
    _PATIENT_NAME,
    _PATIENT_ID,
    _PATIENT_BIRTH_DATE,
    _PATIENT_SEX,
    _STUDY_INSTANCE_UID,
    _SERIES_INSTANCE_UID,
    _STUDY_ID,
    _SERIES_NUMBER,
    _INSTANCE_NUMBER,
]
_LAST_TAG = _INSTANCE_NUMBER
_BEFORE_PIXELS = 0x7FE00007  # the fallback pass stops at (7FE0,0008) and later

# File meta (0002,eeee) elements kept.
_META_SOP_CLASS_UID = 0x0002
_META_SOP_INSTANCE_UID = 0x0003
_META_TRANSFER_SYNTAX = 0x0010

_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM "
    b"UC UI UL UN UR US UT UV".split()
)
_VRS_32BIT_LENGTH = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
_UNDEFINED_LENGTH = 0xFFFFFFFF
_MAX_FIRST_LENGTH = 0x10000  # the first element of a bare data set is small
_PADDING = " \x00"
_VALID_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_INTEGER = re.compile(rb"[+-]?[0-9]{1,12}")
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1  # the range of an IS value


def is_valid_uid(uid: str) -> bool:
    """Tell whether `uid` is at most 64 characters of digits and single dots (PS3.5 9.1).

    Such a UID is safe as a path component. Leading zeros in a component, which PS3.5
    forbids but real files carry, are tolerated. :func:`read_header` accepts any UID;
    anything that builds a path or a file name from a UID must call this first and
    sanitise or hash the UID when it returns False.

    :param uid: a UID as stored in an :class:`~studyvault.records.InstanceHeader`.
    :returns: True when `uid` is a well-formed UID.
    """
    return 0 < len(uid) <= 64 and _VALID_UID.fullmatch(uid) is not None


def looks_like_dicom(path: str | os.PathLike[str]) -> bool:
    """Sniff the first bytes of a file: DICOM preamble and prefix, or a bare data set.

    Cheap (one short read) and content-based: the file name does not matter. A True
    answer does not promise a usable header; :func:`read_header` decides that.

    :param path: the file to look at.
    :returns: True when the file starts like a DICOM file.
    :raises OSError: when the file cannot be opened or read.
    """
    with open(path, "rb") as fp:
        head = fp.read(_PREFIX_LEN)
    return head[128:_PREFIX_LEN] == b"DICM" or _looks_bare(head)


def read_header(path: str | os.PathLike[str]) -> InstanceHeader:
    """Read the header of one DICOM file, never its pixel data.

    :param path: the file; its name and extension do not matter.
    :returns: the attributes studyvault indexes.
    :raises NotDicomError: when the file is not DICOM, is truncated before the end of its
        header, lacks StudyInstanceUID or SOPInstanceUID, or is a DICOMDIR; the message
        is one line, ``<path>: <reason>``.
    :raises OSError: when the file cannot be opened or read (the path is in the error).
    """
    name = str(os.fspath(path))
    try:
        with open(path, "rb", buffering=_CHUNK) as fp:
            size = os.fstat(fp.fileno()).st_size
            head = fp.read(_CHUNK)

            def whole() -> BinaryIO:
                fp.seek(0)
                return fp

            return _read(head, size, name, None, whole)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), name) from exc


def read_header_bytes(
    data: bytes | bytearray | memoryview,
    name: str = "<bytes>",
    *,
    transfer_syntax: str | None = None,
) -> InstanceHeader:
    """Read the header of a DICOM file or data set held in memory.

    `data` may be a whole file (preamble and file meta), file meta without preamble, or
    a bare encoded data set, such as a C-STORE receiver gets.

    :param data: the encoded bytes.
    :param name: what error messages call the data, such as the sending AE and the UID.
    :param transfer_syntax: the transfer syntax of a bare data set when the caller knows
        it (a receiver knows it from the presentation context); needed only for a
        deflated data set without file meta, and used when the data has no file meta.
    :returns: the attributes studyvault indexes.
    :raises NotDicomError: as :func:`read_header` does.
    """
    view = memoryview(data).cast("B")
    head = bytes(view[:_CHUNK])
    return _read(head, len(view), name, transfer_syntax, lambda: io.BytesIO(view))


class _NeedMore(Exception):
    """The first chunk of the data does not hold the whole header."""


def _read(
    head: bytes, size: int, name: str, ts_hint: str | None, whole: Callable[[], BinaryIO]
) -> InstanceHeader:
    """Read the header from `head`, the first bytes of the data, or else from `whole`.

    Parsing an in-memory chunk avoids a system call per element (``tell()`` on a
    buffered file asks the kernel); the whole data is read only when the header does not
    fit in the chunk, or the chunk's answer is an error (the whole data then gives the
    real one).
    """
    if not head:
        raise NotDicomError(f"{name}: not a DICOM file (empty)")
    if head[128:_PREFIX_LEN] == b"DICM":
        start, has_meta = _PREFIX_LEN, True
    elif _looks_bare(head):
        start, has_meta = 0, True  # file meta without preamble, or none at all
    elif ts_hint and len(head) >= 8:
        start, has_meta = 0, False  # the caller vouches for a bare (maybe deflated) set
    else:
        raise NotDicomError(f"{name}: not a DICOM file (no DICM prefix and no DICOM data set)")
    if len(head) < size:
        try:
            return _parse(io.BytesIO(head), len(head), name, ts_hint, start, has_meta, True)
        except Exception:
            pass  # any failure is decided on the whole data, which gives the real reason
        stream = whole()
    else:
        stream = io.BytesIO(head)
    try:
        return _parse(stream, size, name, ts_hint, start, has_meta, False)
    except NotDicomError:
        raise
    except OSError as exc:
        if exc.errno is not None:
            raise
        # pydicom raises a bare OSError when a sequence item runs past the end of data
        raise NotDicomError(f"{name}: truncated DICOM header ({_one_line(exc)})") from exc
    except (EOFError, zlib.error) as exc:
        raise NotDicomError(f"{name}: truncated DICOM header ({_one_line(exc)})") from exc
    except Exception as exc:
        # Whatever bytes a file holds, parsing them must end in a NotDicomError the
        # import can report and skip (struct.error, UnicodeDecodeError, RecursionError on
        # absurd nesting, MemoryError on an absurd length, pydicom's own errors...).
        raise NotDicomError(
            f"{name}: unreadable DICOM header ({type(exc).__name__}: {_one_line(exc)})"
        ) from exc


def _parse(
    fp: BinaryIO,
    size: int,
    name: str,
    ts_hint: str | None,
    start: int,
    has_meta: bool,
    partial: bool,
) -> InstanceHeader:
    """Parse file meta and data set from `fp`, whose data ends at `size`.

    :param partial: `fp` holds only the first `size` bytes of the data: raise
        :class:`_NeedMore` where the rest might be needed.
    """
    fp.seek(start)
    meta = _read_file_meta(fp, size, name) if has_meta else {}
    if meta.get(_META_SOP_CLASS_UID) == MEDIA_STORAGE_DIRECTORY_STORAGE:
        raise NotDicomError(f"{name}: a DICOMDIR (file-set directory), not an instance")
    transfer_syntax = meta.get(_META_TRANSFER_SYNTAX) or ts_hint or ""
    if fp.tell() >= size:
        raise NotDicomError(f"{name}: truncated DICOM header (no data set)")
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        if partial:
            raise _NeedMore
        inflated = _inflate(fp, name)
        fp, size = io.BytesIO(inflated), len(inflated)
    data_start = fp.tell()
    implicit, little = _encoding(fp.read(8), transfer_syntax)
    fp.seek(data_start)
    values = _read_elements(fp, size, implicit, little, _LAST_TAG, name, partial)
    if values is None:
        # Reading stopped after Instance Number without both UIDs: the elements are out
        # of order, so look further, up to the pixel data.
        fp.seek(data_start)
        values = _read_elements(fp, size, implicit, little, _BEFORE_PIXELS, name, partial)
    return _header(values or {}, meta, transfer_syntax, implicit, little, name)


def _looks_bare(head: bytes) -> bool:
    """Tell whether `head` starts like a data set (or file meta) without preamble.

    The first element must be in group 0x0002 (file meta, always explicit VR little
    endian) or 0x0008, implicit or explicit VR, little or big endian (big endian exists
    only with explicit VR), with a modest length.
    """
    if len(head) < 8:
        return False
    explicit = head[4:6] in _VRS
    group_le, group_be = head[0] | head[1] << 8, head[0] << 8 | head[1]
    if group_le == 0x0008 or (group_le == 0x0002 and explicit):
        if explicit:
            length = _explicit_length(head, "<")
        else:
            length = struct.unpack_from("<L", head, 4)[0]
    elif group_be == 0x0008 and explicit:
        length = _explicit_length(head, ">")
    else:
        return False
    return length is not None and length < _MAX_FIRST_LENGTH


def _explicit_length(head: bytes, endian: str) -> int | None:
    if head[4:6] in _VRS_32BIT_LENGTH:
        if head[6:8] != b"\0\0" or len(head) < 12:  # two reserved bytes, then the length
            return None
        return int(struct.unpack_from(endian + "L", head, 8)[0])
    return int(struct.unpack_from(endian + "H", head, 6)[0])


def _read_file_meta(fp: BinaryIO, size: int, name: str) -> dict[int, str]:
    """Read the (0002,eeee) elements at the current position and stop after them.

    File meta is explicit VR little endian; an implicit VR one (a known writer bug) is
    read too. Only the UIDs studyvault needs are kept, cleaned of padding.
    """
    meta: dict[int, str] = {}
    while True:
        pos = fp.tell()
        raw = fp.read(8)
        if len(raw) < 8:
            if raw:  # no element, meta or not, fits in what is left
                raise NotDicomError(f"{name}: truncated DICOM header")
            fp.seek(pos)
            return meta
        if raw[0:2] != b"\x02\x00":
            fp.seek(pos)
            return meta
        elem = raw[2] | raw[3] << 8
        vr = raw[4:6]
        if vr in _VRS_32BIT_LENGTH:
            extra = fp.read(4)
            if len(extra) < 4:
                raise NotDicomError(f"{name}: truncated DICOM header (in the file meta)")
            length = struct.unpack("<L", extra)[0]
        elif vr in _VRS:
            length = raw[6] | raw[7] << 8
        else:
            length = struct.unpack_from("<L", raw, 4)[0]
        if length == _UNDEFINED_LENGTH or fp.tell() + length > size:
            raise NotDicomError(f"{name}: truncated DICOM header (in the file meta)")
        if elem in (_META_SOP_CLASS_UID, _META_SOP_INSTANCE_UID, _META_TRANSFER_SYNTAX):
            meta[elem] = fp.read(length).decode("latin-1").strip(_PADDING)
        else:
            fp.seek(length, os.SEEK_CUR)


def _inflate(fp: BinaryIO, name: str) -> bytes:
    """Inflate a deflated data set (PS3.5 A.5: raw deflate, no zlib header)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    data = inflater.decompress(fp.read(), _MAX_INFLATED)
    if not inflater.eof and len(data) < _MAX_INFLATED:
        raise NotDicomError(f"{name}: truncated DICOM header (deflated data set cut short)")
    return data


def _encoding(first: bytes, transfer_syntax: str) -> tuple[bool, bool]:
    """Return (implicit VR, little endian) for the data set starting with `first`.

    The transfer syntax says little or big endian when there is one; implicit or explicit
    VR is taken from the first element itself, so a mislabelled file still reads (as
    pydicom and DCMTK do).
    """
    if transfer_syntax:
        little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    elif len(first) >= 2:
        # No file meta: the reading with the lower group number is the right one.
        little = (first[0] | first[1] << 8) <= (first[0] << 8 | first[1])
    else:
        little = True
    implicit = first[4:6] not in _VRS if little else False
    return implicit, little


def _read_elements(
    fp: BinaryIO,
    size: int,
    implicit: bool,
    little: bool,
    last_tag: int,
    name: str,
    partial: bool,
) -> dict[int, bytes] | None:
    """Collect the raw values of the wanted top-level elements up to `last_tag`.

    Every element's declared end is checked against `size` before pydicom reads or skips
    it, so a cut file is caught and an absurd length never becomes an absurd read.

    :returns: the raw values by tag; None when reading stopped after `last_tag` without
        both StudyInstanceUID and SOPInstanceUID (the caller may look further).
    """
    tell = fp.tell
    after = int.__gt__  # pydicom's BaseTag compares in Python; the int slot is faster
    end = -1  # where the last top-level element ends; -1 after a sequence
    stopped = truncated = False

    def stop(tag: int, vr: str | None, length: int) -> bool:
        nonlocal end, stopped, truncated
        if after(tag, last_tag):
            stopped = True
            return True
        if length == _UNDEFINED_LENGTH:
            end = -1  # pydicom parses the sequence up to its delimiter
            return False
        end = tell() + length
        if end > size:
            truncated = True
            return True
        return False

    values: dict[int, bytes] = {}
    elements = data_element_generator(fp, implicit, little, stop, None, default_encoding, _TAGS)
    for elem in elements:
        if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
            values[int(elem.tag)] = elem.value  # int keys: BaseTag compares in Python
    if partial and not stopped:
        raise _NeedMore
    if truncated:
        raise NotDicomError(f"{name}: truncated DICOM header")
    if stopped:
        if _STUDY_INSTANCE_UID in values and _SOP_INSTANCE_UID in values:
            return values
        return None if last_tag < _BEFORE_PIXELS else values
    if 0 <= end < size:
        if tell() >= size:  # only part of an element header is left
            raise NotDicomError(f"{name}: truncated DICOM header")
        raise NotDicomError(f"{name}: malformed DICOM data set (stray delimiter at byte {end})")
    return values


def _header(
    values: dict[int, bytes],
    meta: dict[int, str],
    transfer_syntax: str,
    implicit: bool,
    little: bool,
    name: str,
) -> InstanceHeader:
    study_uid = _ascii(values.get(_STUDY_INSTANCE_UID))
    if not study_uid:
        raise NotDicomError(f"{name}: no StudyInstanceUID")
    sop_uid = _ascii(values.get(_SOP_INSTANCE_UID)) or meta.get(_META_SOP_INSTANCE_UID, "")
    if not sop_uid:
        raise NotDicomError(f"{name}: no SOPInstanceUID")
    charset = _ascii(values.get(_CHARSET))
    encodings = convert_encodings([part.strip() for part in charset.split("\\")])
    if not transfer_syntax:
        if implicit:
            transfer_syntax = IMPLICIT_VR_LITTLE_ENDIAN
        else:
            transfer_syntax = EXPLICIT_VR_LITTLE_ENDIAN if little else EXPLICIT_VR_BIG_ENDIAN

    def text(tag: int) -> str:
        raw = values.get(tag)
        if not raw:
            return ""
        return decode_bytes(raw, encodings, TEXT_VR_DELIMS).strip(_PADDING)

    return InstanceHeader(
        study_uid=study_uid,
        series_uid=_ascii(values.get(_SERIES_INSTANCE_UID)),
        sop_uid=sop_uid,
        sop_class_uid=(_ascii(values.get(_SOP_CLASS_UID)) or meta.get(_META_SOP_CLASS_UID, "")),
        transfer_syntax=transfer_syntax,
        patient_name=text(_PATIENT_NAME),
        patient_id=text(_PATIENT_ID),
        patient_birth_date=_ascii(values.get(_PATIENT_BIRTH_DATE)),
        patient_sex=text(_PATIENT_SEX),
        study_date=_date(_ascii(values.get(_STUDY_DATE))),
        study_time=_ascii(values.get(_STUDY_TIME)),
        study_id=text(_STUDY_ID),
        study_description=text(_STUDY_DESCRIPTION),
        accession_number=text(_ACCESSION_NUMBER),
        series_number=_int(values.get(_SERIES_NUMBER)),
        modality=text(_MODALITY),
        series_description=text(_SERIES_DESCRIPTION),
        instance_number=_int(values.get(_INSTANCE_NUMBER)),
        specific_character_set=charset,
    )


def _ascii(raw: bytes | None) -> str:
    """Decode a value of an ASCII-only VR (UI, DA, TM, CS, IS), keeping every byte."""
    return raw.decode("latin-1").strip(_PADDING) if raw else ""


def _date(value: str) -> str:
    """Return `value` if it is a real date written YYYYMMDD, else ""."""
    if len(value) != 8 or not value.isascii() or not value.isdigit():
        return ""
    try:
        datetime.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return ""
    return value


def _int(raw: bytes | None) -> int | None:
    """Return an IS value as int, or None when it is missing or malformed."""
    if not raw:
        return None
    digits = raw.strip(b" \x00")
    if not _INTEGER.fullmatch(digits):
        return None
    number = int(digits)
    return number if _INT_MIN <= number <= _INT_MAX else None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
