"""The DICOM listener of ``studyvault serve``: a C-STORE and C-ECHO SCP (pynetdicom).

Every storage SOP class pynetdicom knows is accepted, in every transfer syntax pydicom
knows (the sender's preferred one wins), and Verification (C-ECHO). An instance is
stored as it arrived: the encoded data set, behind a PS3.10 preamble and file meta
naming the negotiated transfer syntax, is never decoded and re-encoded. Only its
header is read, to index it. :mod:`studyvault.incoming` stores it and says when it is
safe to answer Success.

Statuses sent back (PS3.4 B.2.3):

``0x0000`` Success
    stored, or already stored with the same bytes (a resend: nothing is stored twice).
``0xA700`` Refused: Out of Resources
    no image directory has room (nothing was written), the image directory is offline,
    or the service is stopping. The device keeps the instance and sends it again later.
``0xC000`` Error: Cannot understand
    the data set is not readable DICOM, or has no StudyInstanceUID or SOPInstanceUID.
``0x0111`` Failure: Duplicate SOP Instance
    a *conflict*: an instance with this SOPInstanceUID is already stored with other
    bytes (or in another study). The stored copy is never replaced; the instance sent
    is not stored. An admin decides (the log names the device and the instance).

Associations are refused (A-ASSOCIATE-RJ, permanent) when the called AE title is not
the configured one, when ``allowed_calling_ae_titles`` is set and does not list the
calling AE title ("calling AE title not recognised"), and when ``allowed_hosts`` is set
and does not match the peer's address (IP addresses, networks such as
``192.168.1.0/24``, or host names, resolved when the service starts); and, transiently,
while ``max_associations`` associations are open. Each refusal is logged.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import threading
import time
from collections import deque
from io import BytesIO
from typing import Any, cast

import msgspec
from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from .config import ReceiverConfig
from .dicom import read_header_bytes
from .errors import NotDicomError, ServiceError, StorageFullError, StudyvaultError
from .incoming import IncomingStore
from .ingest import Outcome

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
DUPLICATE_SOP_INSTANCE = 0x0111

#: Seconds after the last instance during which task work still yields to ingest.
BUSY_AFTER_INSTANCE = 2.0
#: What a task waits between studies while studies are being received.
BUSY_PAUSE = 1.0
#: The DUL reactor's idle poll while instances arrive (pynetdicom's default is 1 ms).
#: Each PDU and each answer waits for one poll; a shorter one cuts the time per small
#: instance by about a quarter. An association quiet for IDLE_AFTER seconds goes back to
#: the default, so that devices holding associations open cost little CPU.
_DUL_POLL_BUSY = 0.0002
_DUL_POLL_IDLE = 0.001
IDLE_AFTER = 2.0

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
_NO_REASON = (0x01, 0x01, 0x01)  # rejected-permanent, service user
_CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
_CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)
_TOO_MANY_ASSOCIATIONS = (0x02, 0x03, 0x02)  # rejected-transient, local limit exceeded


class AssociationInfo(msgspec.Struct, kw_only=True):
    """One association being served."""

    calling_ae: str
    address: str
    since: float
    instances: int = 0
    bytes: int = 0


class ReceiverStats(msgspec.Struct, kw_only=True):
    """What the receiver did since the service started (for ``studyvault status``)."""

    ae_title: str
    host: str
    port: int
    listening: bool = False
    associations: list[AssociationInfo] = []
    instances: int = 0  # stored
    bytes: int = 0
    duplicates: int = 0  # resent instances answered Success without storing
    conflicts: int = 0
    refused: int = 0  # not understood, no room, offline
    rejected_associations: int = 0
    last_instance: float = 0.0  # unix time


class _Peers:
    """Which calling AE titles and hosts may send (empty lists: any)."""

    def __init__(self, ae_titles: list[str], hosts: list[str]) -> None:
        self.ae_titles = {title.strip() for title in ae_titles}
        self.hosts = hosts
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for host in hosts:
            try:
                self.networks.append(ipaddress.ip_network(host, strict=False))
                continue
            except ValueError:
                pass
            try:
                infos = socket.getaddrinfo(host, None)
            except OSError as exc:
                log.warning("allowed_hosts: cannot resolve %r (%s); it is ignored", host, exc)
                continue
            for info in infos:
                self.networks.append(ipaddress.ip_network(str(info[4][0])))

    def refusal(self, calling_ae: str, address: str) -> str | None:
        """Why an association from ``calling_ae`` at ``address`` is refused, or None."""
        if self.ae_titles and calling_ae.strip() not in self.ae_titles:
            return f"calling AE title {calling_ae!r} is not in allowed_calling_ae_titles"
        if self.hosts:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return f"host {address} is not an IP address"
            mapped = getattr(ip, "ipv4_mapped", None)
            if not any(ip in net or (mapped and mapped in net) for net in self.networks):
                return f"host {address} is not in allowed_hosts"
        return None


class Receiver:
    """The C-STORE/C-ECHO listener.

    :param settings: the ``[receiver]`` table.
    :param store: where received instances go.
    """

    def __init__(self, settings: ReceiverConfig, store: IncomingStore) -> None:
        self.settings = settings
        self.store = store
        self._peers = _Peers(settings.allowed_calling_ae_titles, settings.allowed_hosts)
        self._lock = threading.Lock()
        self._stats = ReceiverStats(
            ae_title=settings.ae_title, host=settings.host, port=settings.port
        )
        self._associations: dict[int, AssociationInfo] = {}
        self._activity: dict[int, tuple[Any, float]] = {}  # id -> (association, last store)
        self._last_arrival = -BUSY_AFTER_INSTANCE  # monotonic
        # (unix time, calling AE title, address, reason) of the latest refusals, for alerts
        self._rejections: deque[tuple[float, str, str, str]] = deque(maxlen=1000)
        self._ae: AE | None = None
        self._server: Any = None

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        """Listen on the configured host and port (returns at once)."""
        _config.LOG_HANDLER_LEVEL = "none"  # no per-PDU log formatting
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = self.settings.max_associations
        ae.maximum_pdu_size = 0  # no limit: large instances arrive in few PDUs
        ae.require_called_aet = True
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACSE_RECV, self._on_acse),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        address = (self.settings.host, self.settings.port)
        try:
            self._server = ae.start_server(address, block=False, evt_handlers=handlers)
        except OSError as exc:
            raise ServiceError(
                f"receiver: cannot listen on {self.settings.host}:{self.settings.port} "
                f"({exc.strerror or exc}); is another DICOM service using the port?"
            ) from None
        self._ae = ae
        self._stats.listening = True
        log.info(
            "receiving as %s on %s:%d%s",
            self.settings.ae_title,
            self.settings.host,
            self.settings.port,
            f" from {', '.join(sorted(self._peers.ae_titles))}" if self._peers.ae_titles else "",
        )

    def stop_listening(self) -> None:
        """Accept no new association; the current ones go on."""
        if self._server is not None and self._stats.listening:
            self._server.shutdown()
        self._stats.listening = False

    def stop(self, grace: float = 5.0) -> None:
        """Stop listening, give the current associations ``grace`` seconds to finish,
        then abort the rest (their acknowledged instances are safe; the devices send the
        others again)."""
        self.stop_listening()
        deadline = time.monotonic() + grace
        while self.active_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._server is not None:
            for assoc in self._server.active_associations:
                log.warning("aborting the association from %s: the service stops", _peer(assoc))
                assoc.abort()
        self._server = None

    def reconfigure(self, settings: ReceiverConfig) -> None:
        """Apply edited allowed lists at once (the address and AE title need a restart)."""
        self._peers = _Peers(settings.allowed_calling_ae_titles, settings.allowed_hosts)

    # -- state ------------------------------------------------------------------------
    def active_associations(self) -> int:
        with self._lock:
            return len(self._associations)

    def stats(self) -> ReceiverStats:
        with self._lock:
            return msgspec.structs.replace(
                self._stats,
                associations=[msgspec.structs.replace(a) for a in self._associations.values()],
            )

    def recent_rejections(self) -> list[tuple[float, str, str, str]]:
        """The latest refused associations: (unix time, calling AE title, address, why)."""
        with self._lock:
            return list(self._rejections)

    def busy_pause(self) -> float:
        """Seconds a task waits before its next study: :data:`BUSY_PAUSE` while an
        association is open or an instance arrived in the last two seconds, else 0."""
        if self.active_associations():
            return BUSY_PAUSE
        return BUSY_PAUSE if time.monotonic() - self._last_arrival < BUSY_AFTER_INSTANCE else 0.0

    def relax_idle(self) -> None:
        """Give associations that were quiet for :data:`IDLE_AFTER` seconds the default
        poll again (called every few seconds by the service)."""
        now = time.monotonic()
        with self._lock:
            quiet = [a for a, last in self._activity.values() if now - last > IDLE_AFTER]
        for assoc in quiet:
            assoc.dul._run_loop_delay = _DUL_POLL_IDLE

    # -- event handlers (association threads) -----------------------------------------

    def _on_connection(self, event: evt.Event) -> None:
        dul = event.assoc.dul
        dul._run_loop_delay = _DUL_POLL_BUSY
        sock = getattr(dul.socket, "socket", None)
        if sock is not None:  # answers go out at once (Nagle would hold them back)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title if primitive else "").strip()
        called = str(primitive.called_ae_title if primitive else "").strip()
        address = str(assoc.requestor.address)
        reason, code = self._peers.refusal(calling, address), _CALLING_AE_NOT_RECOGNISED
        if reason is not None and reason.startswith("host"):
            code = _NO_REASON
        if called != self.settings.ae_title.strip():
            reason = f"called AE title {called!r} is not {self.settings.ae_title!r}"
            code = _CALLED_AE_NOT_RECOGNISED
        elif reason is None and self.active_associations() >= self.settings.max_associations:
            reason = f"{self.settings.max_associations} associations are open (max_associations)"
            code = _TOO_MANY_ASSOCIATIONS
        if reason is None:
            _prefer_senders_syntaxes(assoc)
            return
        with self._lock:
            self._stats.rejected_associations += 1
            self._rejections.append((time.time(), calling, address, reason))
        log.warning("refused an association from %s at %s: %s", calling, address, reason)
        assoc.acse.send_reject(*code)
        assoc.kill()

    def _on_established(self, event: evt.Event) -> None:
        assoc = event.assoc
        info = AssociationInfo(
            calling_ae=str(assoc.requestor.ae_title).strip(),
            address=str(assoc.requestor.address),
            since=time.time(),
        )
        with self._lock:
            self._associations[id(assoc)] = info
        log.debug("association from %s accepted", _peer(assoc))

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            info = self._associations.pop(id(event.assoc), None)
            self._activity.pop(id(event.assoc), None)
        if info is not None and info.instances:
            log.info(
                "received %d instances (%.1f MB) from %s at %s in %.1f s",
                info.instances,
                info.bytes / 1e6,
                info.calling_ae,
                info.address,
                time.time() - info.since,
            )

    def _on_acse(self, event: evt.Event) -> None:
        primitive = getattr(event, "primitive", None)
        if isinstance(primitive, A_RELEASE) and primitive.result is None:
            # answer the release only once what the association sent is indexed
            self.store.commit()

    def _on_store(self, event: evt.Event) -> int | Dataset:
        self._last_arrival = time.monotonic()
        assoc = event.assoc
        assoc.dul._run_loop_delay = _DUL_POLL_BUSY
        with self._lock:
            self._activity[id(assoc)] = (assoc, self._last_arrival)
        calling = str(assoc.requestor.ae_title).strip()
        request = cast(C_STORE, event.request)
        # the data set as received, without the copy event.encoded_dataset() makes
        with cast(BytesIO, request.DataSet).getbuffer() as received:
            data = part10(
                received,
                sop_class=str(request.AffectedSOPClassUID),
                sop_instance=str(request.AffectedSOPInstanceUID),
                transfer_syntax=str(event.context.transfer_syntax),
                source_ae=calling,
            )
        name = f"{calling}: instance {request.AffectedSOPInstanceUID}"
        try:
            header = read_header_bytes(data, name, transfer_syntax=event.context.transfer_syntax)
        except NotDicomError as exc:
            return self._refuse(CANNOT_UNDERSTAND, exc, str(exc).removeprefix(f"{name}: "))
        try:
            outcome, reason = self.store.store(data, header, f"network:{calling}")
        except StorageFullError as exc:
            return self._refuse(OUT_OF_RESOURCES, exc, level=logging.ERROR)
        except StudyvaultError as exc:
            return self._refuse(OUT_OF_RESOURCES, exc, level=logging.ERROR)
        finally:
            self._last_arrival = time.monotonic()
        with self._lock:
            if outcome is Outcome.STORED:
                self._stats.instances += 1
                self._stats.bytes += len(data)
                self._stats.last_instance = time.time()
                info = self._associations.get(id(assoc))
                if info is not None:
                    info.instances += 1
                    info.bytes += len(data)
            elif outcome is Outcome.DUPLICATE:
                self._stats.duplicates += 1
            else:
                self._stats.conflicts += 1
        if outcome is Outcome.CONFLICT:
            log.warning("%s: not stored: %s", name, reason)
            return _status(DUPLICATE_SOP_INSTANCE, reason)
        return SUCCESS

    def _refuse(
        self,
        code: int,
        exc: StudyvaultError,
        comment: str | None = None,
        *,
        level: int = logging.WARNING,
    ) -> Dataset:
        with self._lock:
            self._stats.refused += 1
        log.log(level, "refused an instance (status 0x%04X): %s", code, exc)
        return _status(code, str(exc) if comment is None else comment)


def _prefer_senders_syntaxes(assoc: Any) -> None:
    """Accept, for each SOP class, the transfer syntax the device lists first of those
    it proposes (pynetdicom alone would take the first of ours, which is implicit VR
    little endian: a device offering JPEG first would be made to decompress)."""
    primitive = assoc.requestor.primitive
    if primitive is None:
        return
    wanted: dict[str, list[str]] = {}
    for proposed in primitive.presentation_context_definition_list:
        order = wanted.setdefault(str(proposed.abstract_syntax), [])
        order.extend(str(ts) for ts in proposed.transfer_syntax if str(ts) not in order)
    contexts = []
    for context in assoc.acceptor.supported_contexts:
        theirs = wanted.get(str(context.abstract_syntax))
        if theirs:
            ours = [str(ts) for ts in context.transfer_syntax]
            first = [ts for ts in theirs if ts in ours]
            context.transfer_syntax = first + [ts for ts in ours if ts not in first]
        contexts.append(context)
    assoc.acceptor.supported_contexts = contexts


def part10(
    data_set: bytes | memoryview,
    *,
    sop_class: str,
    sop_instance: str,
    transfer_syntax: str,
    source_ae: str,
) -> bytes:
    """A PS3.10 file: preamble, ``DICM``, file meta, then ``data_set`` byte for byte.

    The file meta is encoded here (explicit VR little endian) rather than with pydicom,
    which takes a millisecond per instance. (0002,0016) *Source Application Entity
    Title* records the sending device, as DCMTK's storescp does.
    """
    elements = [
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _uid(sop_class)),
        _meta_element(0x0003, b"UI", _uid(sop_instance)),
        _meta_element(0x0010, b"UI", _uid(transfer_syntax)),
        _meta_element(0x0012, b"UI", _uid(PYNETDICOM_IMPLEMENTATION_UID)),
        _meta_element(0x0013, b"SH", _text(PYNETDICOM_IMPLEMENTATION_VERSION)),
    ]
    if source_ae:
        elements.append(_meta_element(0x0016, b"AE", _text(source_ae[:16])))
    body = b"".join(elements)
    group_length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"".join((bytes(128), b"DICM", group_length, body, data_set))


def _uid(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    # LO: at most 64 characters of the default repertoire, no backslash
    text = comment.encode("ascii", "replace").decode().replace("\\", "/")
    status.ErrorComment = text[:64]
    return status


def _peer(assoc: Any) -> str:
    return f"{str(assoc.requestor.ae_title).strip()} at {assoc.requestor.address}"
