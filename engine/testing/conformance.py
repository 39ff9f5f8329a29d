"""The conformance suite every storage backend passes, for pytest.

A plugin author subclasses :class:`StorageConformance` in a test module and says how
to make a storage of the kind under test; every ``test_*`` method then runs against it,
on real DICOM files made by :mod:`studyvault.testing.dicomgen`::

    import uuid
    from studyvault.testing.conformance import StorageConformance

    class TestMyStorage(StorageConformance):
        def make_storage(self, tmp_path, *, min_free_mb=0):
            config = MyConfig(
                name="under test",
                id=str(uuid.uuid4()),
                path=str(tmp_path / "storage"),
                min_free_mb=min_free_mb,
            )
            return MyStorage(config)

The suite drives exactly what the engine's transfer protocol calls: ``plan_store``,
``write_staging``, ``open_file`` on the staging (to verify every file against its
SHA-256), ``publish``; then ``iter_studies``/``iter_files`` (index rebuild),
``discard_staging`` (a killed run), ``remove_study``, ``free_bytes``, ``check_room`` and
the refusal of ``create`` on a folder that holds someone else's files.

Importing this module needs pytest; :mod:`studyvault` itself does not.
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from studyvault.dicom import read_header
from studyvault.errors import StorageError, StorageFullError
from studyvault.naming import is_safe_relpath
from studyvault.records import InstanceRecord, StudyRecord, header_to_instance, header_to_study
from studyvault.storage import Opener, Status, Storage, StorePlan
from studyvault.testing.dicomgen import make_instance, make_study

__all__ = [
    "SourceStudy",
    "StorageConformance",
    "make_source_study",
    "read_back",
    "store",
]


@dataclass
class SourceStudy:
    """A study on disk with the index records the engine would hold for it.

    :param study: the study record (``copies`` filled in by the tests as the engine would).
    :param instances: one record per file, with its size and SHA-256.
    :param files: SOPInstanceUID -> the file holding that instance.
    """

    study: StudyRecord
    instances: list[InstanceRecord]
    files: dict[str, Path] = field(default_factory=dict)

    def items(self) -> list[tuple[InstanceRecord, Opener]]:
        """(record, opener) pairs, as the engine hands them to ``write_staging``."""
        return [(inst, _opener(self.files[inst.sop_uid])) for inst in self.instances]

    def digests(self) -> set[str]:
        return {inst.sha256 for inst in self.instances}

    def with_instance(self, path: Path, series: int = 0) -> SourceStudy:
        """The same study with one more instance, written at ``path`` in the
        ``series``-th series (a study that grew while it was fetched)."""
        first = self.instances[series]
        make_instance(
            path,
            study_uid=self.study.study_uid,
            series_uid=first.series_uid,
            InstanceNumber=len(self.instances) + 1,
            SeriesNumber=first.series_number or 1,
        )
        inst = _record(path)
        files = {**self.files, inst.sop_uid: path}
        study = msgspec.structs.replace(self.study, copies=dict(self.study.copies))
        return SourceStudy(study, [*self.instances, inst], files)


def _opener(path: Path) -> Opener:
    return lambda: open(path, "rb")


def _record(path: Path) -> InstanceRecord:
    data = path.read_bytes()
    return header_to_instance(
        read_header(path), size=len(data), sha256=hashlib.sha256(data).hexdigest(), received=0.0
    )


def make_source_study(
    folder: Path, *, n_instances: int = 4, n_series: int = 2, **attrs: object
) -> SourceStudy:
    """Write a study with :func:`~studyvault.testing.dicomgen.make_study` and build
    its records from the files' headers, as an import would.

    :param folder: where the files go.
    :param attrs: more arguments of ``make_study`` (``patient_name``, ``study_date``...).
    """
    paths = make_study(folder, n_instances=n_instances, n_series=n_series, **attrs)
    instances = [_record(p) for p in paths]
    study = header_to_study(read_header(paths[0]))
    study.instance_count = len(instances)
    study.size = sum(inst.size for inst in instances)
    files = {inst.sop_uid: p for inst, p in zip(instances, paths, strict=True)}
    return SourceStudy(study, instances, files)


def verify_staging(storage: Storage, plan: StorePlan, source: SourceStudy) -> None:
    """What the engine does between writing and publishing: read every staged file
    back and compare it with the recorded SHA-256."""
    for inst in source.instances:
        with storage.open_file(plan.staging, plan.paths[inst.sop_uid]) as f:
            assert hashlib.sha256(f.read()).hexdigest() == inst.sha256, inst.sop_uid


def store(storage: Storage, source: SourceStudy) -> StorePlan:
    """Store a study the way the transfer protocol does; return the plan. The study's
    ``copies`` then names the new location, as after the engine's index commit."""
    plan = storage.plan_store(source.study, source.instances)
    storage.write_staging(plan, source.study, source.items())
    verify_staging(storage, plan, source)
    storage.publish(plan)
    source.study.copies[storage.id] = plan.location
    return plan


def read_back(storage: Storage, location: str) -> dict[str, str]:
    """path -> SHA-256 of every instance file ``iter_files`` yields for a study."""
    found = {}
    for path, opener in storage.iter_files(location):
        with opener() as f:
            found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


class StorageConformance:
    """Subclass it (named ``Test…``) and override :meth:`make_storage`."""

    def make_storage(self, tmp_path: Path, *, min_free_mb: int = 0) -> Storage:
        """Return a storage of the kind under test, not yet created, configured with an
        id and a root folder that does not exist yet below ``tmp_path``.

        :param tmp_path: pytest's temporary folder of the test.
        :param min_free_mb: the free-space reserve to configure.
        """
        raise NotImplementedError("override make_storage() in your conformance test class")

    def interrupt_publish(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make the next :meth:`~studyvault.storage.Storage.publish` fail half-way, as a
        power cut would. The default makes ``os.replace`` fail, which interrupts a
        backend built on :func:`studyvault.fsutil.publish_folder` after it moved the
        old copy aside. Override it for a backend that publishes otherwise."""

        def fail(*args: object, **kwargs: object) -> None:
            raise OSError(errno.EIO, "simulated power cut during publish")

        monkeypatch.setattr(os, "replace", fail)

    # -- fixtures -------------------------------------------------------------------
    @pytest.fixture
    def storage(self, tmp_path: Path) -> Storage:
        storage = self.make_storage(tmp_path)
        storage.create()
        return storage

    @pytest.fixture
    def source(self, tmp_path: Path) -> SourceStudy:
        return make_source_study(tmp_path / "source", n_instances=4, n_series=2)

    # -- identity -------------------------------------------------------------------
    def test_create_makes_an_empty_online_storage(self, tmp_path: Path) -> None:
        storage = self.make_storage(tmp_path)
        configured = storage.id
        new_id = storage.create()
        assert new_id and (not configured or new_id == configured)
        assert storage.status() is Status.ONLINE
        assert list(storage.iter_studies()) == []
        assert storage.describe()

    def test_create_refuses_a_folder_holding_other_files(self, tmp_path: Path) -> None:
        storage = self.make_storage(tmp_path)
        storage.root.mkdir(parents=True)
        (storage.root / "holiday.jpg").write_bytes(b"not ours")
        with pytest.raises(StorageError, match="not empty"):
            storage.create()
        assert _files(storage.root) == {"holiday.jpg"}
        assert (storage.root / "holiday.jpg").read_bytes() == b"not ours"

    def test_free_bytes_of_a_new_storage(self, storage: Storage) -> None:
        assert storage.free_bytes() > 0

    # -- storing --------------------------------------------------------------------
    def test_plan_store_writes_nothing(self, storage: Storage, source: SourceStudy) -> None:
        before = _files(storage.root)
        plan = storage.plan_store(source.study, source.instances)
        assert _files(storage.root) == before
        assert set(plan.paths) == {inst.sop_uid for inst in source.instances}
        assert len(set(plan.paths.values())) == len(plan.paths)
        for name in (plan.location, plan.staging, *plan.paths.values()):
            assert is_safe_relpath(name), name
        assert plan.location != plan.staging

    def test_stored_study_reads_back_byte_for_byte(
        self, storage: Storage, source: SourceStudy
    ) -> None:
        plan = store(storage, source)
        assert list(storage.iter_studies()) == [plan.location]
        expected = {plan.paths[i.sop_uid]: i.sha256 for i in source.instances}
        assert read_back(storage, plan.location) == expected
        for path, digest in expected.items():
            with storage.open_file(plan.location, path) as f:
                assert hashlib.sha256(f.read()).hexdigest() == digest

    def test_staging_is_invisible_until_published(
        self, storage: Storage, source: SourceStudy
    ) -> None:
        plan = storage.plan_store(source.study, source.instances)
        storage.write_staging(plan, source.study, source.items())
        verify_staging(storage, plan, source)
        assert list(storage.iter_studies()) == []
        storage.discard_staging(plan)
        assert list(storage.iter_studies()) == []
        storage.discard_staging(plan)  # idempotent

    def test_write_staging_again_starts_afresh(self, storage: Storage, source: SourceStudy) -> None:
        plan = storage.plan_store(source.study, source.instances)
        storage.write_staging(plan, source.study, source.items()[:1])  # a killed attempt
        storage.write_staging(plan, source.study, source.items())
        verify_staging(storage, plan, source)
        storage.publish(plan)
        assert set(read_back(storage, plan.location).values()) == source.digests()

    def test_publish_again_after_it_completed_does_nothing(
        self, storage: Storage, source: SourceStudy
    ) -> None:
        plan = store(storage, source)
        storage.publish(plan)  # a resumed run repeats the step it may not have finished
        assert list(storage.iter_studies()) == [plan.location]
        assert set(read_back(storage, plan.location).values()) == source.digests()

    def test_storing_again_merges_into_the_same_location(
        self, storage: Storage, source: SourceStudy, tmp_path: Path
    ) -> None:
        first = store(storage, source)
        grown = source.with_instance(tmp_path / "source" / "late.dcm")
        second = store(storage, grown)
        assert second.location == first.location
        assert list(storage.iter_studies()) == [first.location]
        expected = {second.paths[i.sop_uid]: i.sha256 for i in grown.instances}
        assert read_back(storage, first.location) == expected

    def test_discard_before_publish_keeps_the_old_copy(
        self, storage: Storage, source: SourceStudy, tmp_path: Path
    ) -> None:
        first = store(storage, source)
        grown = source.with_instance(tmp_path / "source" / "late.dcm")
        plan = storage.plan_store(grown.study, grown.instances)
        storage.write_staging(plan, grown.study, grown.items())
        storage.discard_staging(plan)
        assert list(storage.iter_studies()) == [first.location]
        assert set(read_back(storage, first.location).values()) == source.digests()

    def test_discard_after_an_interrupted_publish_restores_the_old_copy(
        self,
        storage: Storage,
        source: SourceStudy,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        first = store(storage, source)
        grown = source.with_instance(tmp_path / "source" / "late.dcm")
        plan = storage.plan_store(grown.study, grown.instances)
        storage.write_staging(plan, grown.study, grown.items())
        verify_staging(storage, plan, grown)
        with monkeypatch.context() as patch:
            self.interrupt_publish(patch)
            try:
                storage.publish(plan)
            except OSError:
                pass
            else:
                pytest.skip("interrupt_publish() did not interrupt this backend's publish")
        storage.discard_staging(plan)  # what the journal replay does for an unpublished run
        assert list(storage.iter_studies()) == [first.location]
        assert set(read_back(storage, first.location).values()) == source.digests()

    # -- removing -------------------------------------------------------------------
    def test_remove_study_is_idempotent(self, storage: Storage, source: SourceStudy) -> None:
        plan = store(storage, source)
        storage.remove_study(plan.location)
        assert list(storage.iter_studies()) == []
        storage.remove_study(plan.location)
        assert list(storage.iter_studies()) == []
        path = next(iter(plan.paths.values()))
        with pytest.raises(OSError):
            storage.open_file(plan.location, path).close()

    # -- free space -----------------------------------------------------------------
    def test_check_room_refuses_what_would_eat_into_the_reserve(self, tmp_path: Path) -> None:
        storage = self.make_storage(tmp_path, min_free_mb=1 << 40)  # an exabyte
        storage.create()
        with pytest.raises(StorageFullError, match="full"):
            storage.check_room(1)
        roomy = self.make_storage(tmp_path / "roomy", min_free_mb=0)
        roomy.create()
        roomy.check_room(1)
