"""The LMDB study index: records, secondary keys, streaming, growth, corruption."""

from __future__ import annotations

import pytest

from studyvault.errors import IndexCorruptError
from studyvault.index import StudyIndex
from studyvault.records import InstanceRecord, StudyRecord


def study(uid: str, date: str, storage: str = "s1", patient: str = "P") -> StudyRecord:
    return StudyRecord(study_uid=uid, study_date=date, patient_id=patient, copies={storage: uid})


def test_studies_stream_oldest_first_and_filter_by_date_and_storage(tmp_path):
    with StudyIndex(tmp_path / "index") as index:
        for uid, date, storage in [
            ("1.3", "20200101", "a"),
            ("1.1", "20100101", "b"),
            ("1.2", "20150101", "a"),
            ("1.4", "", "a"),
        ]:
            index.put_study(study(uid, date, storage))
        assert [s.study_uid for s in index.iter_studies()] == ["1.4", "1.1", "1.2", "1.3"]
        assert [
            s.study_uid for s in index.iter_studies(date_to="20151231", include_undated=False)
        ] == ["1.1", "1.2"]
        assert [
            s.study_uid
            for s in index.iter_studies(
                date_from="20120101", date_to="20201231", include_undated=False
            )
        ] == ["1.2", "1.3"]
        assert sorted(s.study_uid for s in index.iter_studies(storage="a")) == ["1.2", "1.3", "1.4"]


def test_changing_a_study_moves_its_secondary_keys(tmp_path):
    with StudyIndex(tmp_path / "index") as index:
        index.put_study(study("1.1", "20100101", "a"))
        changed = study("1.1", "20110101", "b")
        index.put_study(changed)
        assert [s.study_uid for s in index.iter_studies(storage="a")] == []
        assert [s.study_uid for s in index.iter_studies(storage="b")] == ["1.1"]
        assert [s.study_date for s in index.iter_studies()] == ["20110101"]


def test_scans_stream_in_chunks_without_holding_a_transaction(tmp_path):
    with StudyIndex(tmp_path / "index") as index:
        index.apply(
            lambda w: [w.put_study(study(f"1.{i:05d}", "20100101"), None) for i in range(2000)]
        )
        seen = 0
        for _ in index.iter_studies():
            if seen == 700:  # writing mid-scan works: no read transaction is open
                index.put_study(study("1.99999", "20300101"))
            seen += 1
        assert seen == 2001


def test_instances_and_sop_lookup(tmp_path):
    with StudyIndex(tmp_path / "index") as index:
        inst = InstanceRecord(
            study_uid="1.1",
            series_uid="1.1.1",
            sop_uid="1.1.1.1",
            size=10,
            sha256="ab",
            paths={"s1": "x.dcm"},
        )
        index.put_study(study("1.1", "20100101"), [inst])
        assert index.instances("1.1") == [inst]
        assert index.study_of_sop("1.1.1.1") == "1.1"
        index.delete_study("1.1")
        assert index.instances("1.1") == [] and index.study_of_sop("1.1.1.1") is None
        assert index.count_studies() == 0


def test_map_grows_when_full(tmp_path):
    with StudyIndex(tmp_path / "index", map_size=64 * 1024) as index:
        big = "x" * 2000
        index.apply(
            lambda w: [
                w.put_study(StudyRecord(study_uid=f"1.{i}", study_description=big), None)
                for i in range(500)
            ]
        )
        assert index.count_studies() == 500
        assert index.env.info()["map_size"] > 64 * 1024


def test_a_truncated_index_file_says_to_rebuild(tmp_path, run, home):
    index_dir = home / "index"
    with StudyIndex(index_dir):
        pass
    data = index_dir / "data.mdb"
    data.write_bytes(data.read_bytes()[:5000])
    with pytest.raises(IndexCorruptError, match="studyvault index rebuild"):
        StudyIndex(index_dir)
    result = run("studies")
    assert result.code == 2 and "index rebuild" in result.err


def test_a_garbage_index_file_says_to_rebuild(tmp_path):
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "data.mdb").write_bytes(b"\x00garbage" * 4096)
    with pytest.raises(IndexCorruptError, match="studyvault index rebuild"):
        StudyIndex(tmp_path / "index")
