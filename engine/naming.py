"""Safe file and folder names made from DICOM values, for folder archives.

A patient name or a UID comes from outside and may be anything; nothing built here
can name a place outside the folder it is joined to, on Linux, macOS or Windows.

Readable study folders are ``<YYYY>/<YYYYMMDD> <PATIENT NAME> <short id>``. A study
whose date is empty or not a valid ``YYYYMMDD`` goes to
``unknown-date/unknown-date <PATIENT NAME> <short id>``.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import unicodedata
from collections.abc import Sequence

from studyvault.records import InstanceRecord, StudyRecord

#: Folder (and date) name used when a study has no valid StudyDate.
UNKNOWN_DATE = "unknown-date"
#: Name used when nothing usable is left of a value.
UNKNOWN = "UNKNOWN"

_FORBIDDEN = frozenset('<>:"/\\|?*')
# Cc control, Cf format (e.g. bidi overrides that disguise a name), Cs lone
# surrogates (not encodable), Zl/Zp line and paragraph separators.
_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{dev}{n}" for dev in ("COM", "LPT") for n in [*"123456789", "¹", "²", "³"]}
)
_VALID_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_DIGITS = re.compile(r"[0-9]+")
_MAX_COMPONENT_BYTES = 255


def _is_reserved(name: str) -> bool:
    # Windows ignores the extension and trailing spaces: "con .txt" is the console.
    return name.split(".", 1)[0].rstrip(" ").upper() in _RESERVED


def _truncate_utf8(text: str, max_bytes: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    cut = data[:max_bytes].decode("utf-8", errors="ignore")
    # do not leave a combining mark without its base letter
    while cut and unicodedata.combining(cut[-1]):
        cut = cut[:-1]
    return cut


def sanitize_component(text: str, max_len: int = 64) -> str:
    """Make one path component, safe on Linux, macOS and Windows, from a DICOM value.

    PN ``^`` separators become spaces; control characters, path separators and
    ``<>:"|?*`` become ``_`` or disappear; runs of white space become one space;
    leading and trailing dots, spaces and dashes are removed; a reserved Windows
    device name (``CON``, ``com1.txt``...) gets a leading ``_``. Letters of any
    script are kept. The result is NFC-normalised, at most *max_len* UTF-8 bytes,
    and never empty (:data:`UNKNOWN`).

    :param text: the value, e.g. a PatientName.
    :param max_len: the largest length of the result in UTF-8 bytes (8 to 255).
    :raises ValueError: if *max_len* is out of range.
    """
    if not len(UNKNOWN) <= max_len <= _MAX_COMPONENT_BYTES:
        msg = f"max_len must be from {len(UNKNOWN)} to {_MAX_COMPONENT_BYTES}, got {max_len}"
        raise ValueError(msg)
    text = unicodedata.normalize("NFC", text.replace("^", " "))
    kept = []
    for char in text:
        if char in _FORBIDDEN:
            kept.append("_")
        elif char.isspace():
            kept.append(" ")
        elif unicodedata.category(char) not in _DROP_CATEGORIES:
            kept.append(char)
    name = " ".join("".join(kept).split())
    name = _truncate_utf8(name.strip(" .-"), max_len).strip(" .-")
    if not name:
        return UNKNOWN
    if _is_reserved(name):
        # the prefix may push it over max_len; cut again (a "_" name is never reserved)
        name = _truncate_utf8("_" + name, max_len).rstrip(" .-")
    return name


def short_id(study_uid: str, length: int = 8) -> str:
    """Return a stable lower-case hex id of a study: the start of SHA-256(UID).

    :param study_uid: the StudyInstanceUID.
    :param length: number of hex digits, 1 to 64.
    :raises ValueError: if *length* is out of range.
    """
    if not 1 <= length <= 64:
        msg = f"length must be from 1 to 64, got {length}"
        raise ValueError(msg)
    return hashlib.sha256(study_uid.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def normalize_date(value: str) -> str | None:
    """Return a DICOM date as ``YYYYMMDD``, or None when it is empty or not a real date.

    Accepts ``YYYYMMDD`` and the old ``YYYY.MM.DD`` / ``YYYY-MM-DD`` forms.

    :param value: a DA value, e.g. StudyDate.
    """
    digits = value.strip().replace(".", "").replace("-", "")
    if len(digits) != 8 or not _DIGITS.fullmatch(digits):
        return None
    try:
        datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None
    return digits


def readable_study_path(study: StudyRecord, suffix_len: int = 8) -> str:
    """Return ``<YYYY>/<YYYYMMDD> <PATIENT NAME> <short id>`` for a study.

    Undated studies (or a malformed StudyDate) get ``unknown-date`` for both the
    year and the date. The result is a relative POSIX path.

    :param study: the study.
    :param suffix_len: hex digits of the :func:`short_id` suffix that keeps names unique.
    """
    date = normalize_date(study.study_date)
    year, day = (date[:4], date) if date else (UNKNOWN_DATE, UNKNOWN_DATE)
    name = sanitize_component(study.patient_name)
    leaf = f"{day} {name} {short_id(study.study_uid, suffix_len)}"
    return f"{year}/{sanitize_component(leaf, _MAX_COMPONENT_BYTES)}"


def uid_study_path(study: StudyRecord) -> str:
    """Return the StudyInstanceUID as a one-component relative path.

    A UID that is not a valid DICOM UID is sanitised and given a ``-<hash>`` suffix,
    so two different values never share a folder (valid UIDs never contain ``-``).

    :param study: the study.
    """
    uid = study.study_uid
    if len(uid) <= 64 and _VALID_UID.fullmatch(uid):
        return uid
    return f"{sanitize_component(uid, 64)}-{short_id(uid, 16)}"


def _is_safe_component(part: str) -> bool:
    return (
        part not in ("", ".", "..")
        and not any(c in _FORBIDDEN or unicodedata.category(c) in _DROP_CATEGORIES for c in part)
        and part[-1] not in ". "
        and not _is_reserved(part)
        and len(part.encode("utf-8", "surrogatepass")) <= _MAX_COMPONENT_BYTES
    )


def is_safe_relpath(p: str) -> bool:
    """Tell whether *p* is a relative POSIX path that stays inside the folder it is joined to.

    Used to reject zip-slip members: absolute paths, drive letters, backslashes,
    ``.``/``..`` or empty components, control characters, reserved Windows names.
    One trailing ``/`` (a zip folder entry) is allowed.

    :param p: the path, with ``/`` separators.
    """
    if p.endswith("/"):
        p = p[:-1]
    return bool(p) and all(_is_safe_component(part) for part in p.split("/"))


def _series_key(inst: InstanceRecord) -> tuple[bool, int, str]:
    return (inst.series_number is None, inst.series_number or 0, inst.series_uid)


def _instance_key(inst: InstanceRecord) -> tuple[bool, int, str]:
    return (inst.instance_number is None, inst.instance_number or 0, inst.sop_uid)


def assign_file_ids(instances: Sequence[InstanceRecord]) -> list[tuple[InstanceRecord, str]]:
    """Give every instance of one study a PS3.10 file ID, e.g. ``DICOM/S0000001/I0000001``.

    Series are ordered by (SeriesNumber, SeriesInstanceUID), instances within a series
    by (InstanceNumber, SOPInstanceUID); missing numbers sort last. The same instances
    always get the same IDs, whatever their input order.

    :param instances: the instances of one study.
    :returns: (instance, file ID with ``/`` separators) in file-set order.
    :raises ValueError: if the instances belong to several studies or repeat a SOP UID.
    """
    studies = {inst.study_uid for inst in instances}
    if len(studies) > 1:
        msg = f"instances of {len(studies)} studies given, file IDs are per study"
        raise ValueError(msg)
    series: dict[str, list[InstanceRecord]] = {}
    for inst in instances:
        series.setdefault(inst.series_uid, []).append(inst)
    firsts = sorted((min(group, key=_series_key) for group in series.values()), key=_series_key)
    seen: set[str] = set()
    result: list[tuple[InstanceRecord, str]] = []
    for s_index, first in enumerate(firsts, start=1):
        members = sorted(series[first.series_uid], key=_instance_key)
        for i_index, inst in enumerate(members, start=1):
            if inst.sop_uid in seen:
                msg = f"SOPInstanceUID {inst.sop_uid} appears twice in study {inst.study_uid}"
                raise ValueError(msg)
            seen.add(inst.sop_uid)
            result.append((inst, f"DICOM/S{s_index:07d}/I{i_index:07d}"))
    return result
