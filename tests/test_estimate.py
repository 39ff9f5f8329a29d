"""``studyvault estimate``: storage needed per year and in total, and, from the live
index, the growth per month and the days until each storage is full."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from studyvault.estimate import observe
from studyvault.testing.dicomgen import make_study
from studyvault.vault import Vault

SEED = (
    "--machines",
    2,
    "--studies-per-day",
    10,
    "--days-per-year",
    250,
    "--study-mb",
    150,
    "--years",
    7,
)
GB = 1000**3


def row(out: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first``."""
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line)[1:-1]]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{out}")


def test_seed_example_two_ultrasound_machines_for_seven_years(run):
    result = run("estimate", *SEED, "--no-live")
    assert result.code == 0, result.err
    out = result.out
    assert "Workload: 2 machines x 10 studies a day x 250 days a year x 150 MB a study" in out
    assert "375 GB per machine per year (2,500 studies)" in out
    assert "750 GB per year for 2 machines (5,000 studies)" in out
    assert "5.25 TB in total for 7 years (35,000 studies)" in out
    # the seed's "about 6 TB": 7 years kept plus the year being filled
    assert "6 TB at the most held at once when studies are deleted after 7 years" in out
    assert row(out, "1") == ["1", "5,000", "750 GB", "750 GB"]
    assert row(out, "2") == ["2", "5,000", "750 GB", "1.5 TB"]
    assert row(out, "7") == ["7", "5,000", "750 GB", "5.25 TB"]
    assert "1 GB = 1000 MB" in out
    assert "Observed" not in out

    data = run("estimate", *SEED, "--no-live", "--json").json()
    p = data["projection"]
    assert p["per_machine_per_year_bytes"] == 375 * GB
    assert p["per_year_bytes"] == 750 * GB
    assert p["total_bytes"] == 5250 * GB
    assert p["peak_bytes"] == 6000 * GB
    assert p["total_studies"] == 35_000
    assert [y["total_bytes"] for y in p["years"]] == [750 * GB * n for n in range(1, 8)]
    assert data["live"] is None


def test_defaults_are_one_machine_of_the_seed(run):
    p = run("estimate", "--no-live", "--json").json()["projection"]
    assert p["workload"] == {
        "machines": 1,
        "studies_per_day": 10.0,
        "days_per_year": 250,
        "study_mb": 150.0,
        "years": 7,
    }
    assert p["per_year_bytes"] == 375 * GB and p["total_bytes"] == 2625 * GB


def test_fractional_figures(run):
    out = run(
        "estimate", "--studies-per-day", 7.5, "--study-mb", 42.5, "--years", 3, "--no-live"
    ).out
    # 7.5 x 250 x 42.5 MB = 79,687.5 MB a year
    assert "79.69 GB per machine per year (1,875 studies)" in out
    assert "239.06 GB in total for 3 years (5,625 studies)" in out


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--machines", "0", "--machines: must be more than 0, not 0"),
        ("--machines", "-2", "--machines: must be more than 0, not -2"),
        ("--studies-per-day", "-5", "--studies-per-day: must be more than 0, not -5"),
        ("--days-per-year", "400", "--days-per-year: 400 is more than 366"),
        ("--study-mb", "0", "--study-mb: must be more than 0, not 0"),
        ("--years", "-1", "--years: must be more than 0, not -1"),
        ("--months", "0", "--months: must be more than 0, not 0"),
    ],
)
def test_bad_figures_get_one_line_and_exit_2(run, option, value, message):
    result = run("estimate", option, value)
    assert result.code == 2
    assert result.err == f"studyvault: error: {message}\n"
    assert result.out == ""


def test_without_a_config_there_is_no_live_part_and_nothing_is_created(run, tmp_path, monkeypatch):
    monkeypatch.delenv("STUDYVAULT_CONFIG", raising=False)
    monkeypatch.setenv("STUDYVAULT_HOME", str(tmp_path / "home"))
    result = run("estimate")
    assert result.code == 0, result.err
    assert "No studyvault set up here yet: no observed growth to show." in result.out
    assert run("estimate", "--json").json()["live"] is None
    assert not (tmp_path / "home").exists()


def imported(run, tmp_path: Path) -> list[Path]:
    files = []
    for i, name in enumerate(("DOE^JANE", "ROE^RICHARD", "POE^EDGAR")):
        files += make_study(tmp_path / "cd" / name, n_instances=2 + i, patient_name=name)
    assert run("import", tmp_path / "cd").code == 0
    return files


def test_growth_and_days_left_from_the_live_index(home, run, tmp_path):
    files = imported(run, tmp_path)
    assert run("archives", "add", "My Study Archive", tmp_path / "archive").code == 0
    stored = sum(f.stat().st_size for f in files)

    live = run("estimate", "--json").json()["live"]
    this_month = time.strftime("%Y-%m")
    assert [m["month"] for m in live["months"]][-1] == this_month and len(live["months"]) == 6
    assert live["months"][-1] == {"month": this_month, "studies": 3, "bytes": stored}
    assert all(m["bytes"] == 0 for m in live["months"][:-1])
    # all stored just now: averaged over the minimum of one day
    assert live["days"] == 1 and live["bytes_per_day"] == stored
    assert live["bytes_per_month"] == pytest.approx(stored * 30.436875)
    storages = {s["name"]: s for s in live["storages"]}
    assert set(storages) == {"Image Center Storage", "My Study Archive"}
    for s in storages.values():
        assert s["status"] == "Online"
        assert s["usable_bytes"] == max(s["free_bytes"] - s["reserve_bytes"], 0)
        assert s["days_left"] == s["usable_bytes"] // stored
    assert storages["My Study Archive"]["reserve_mb"] == 1024

    out = run("estimate", "--months", 3).out
    assert "Observed in the study index" in out
    assert row(out, this_month)[1] == "3"
    assert re.search(r"Growth: .* a month, .* a day, .* a year \(averaged over 1 day since", out)
    cells = row(out, "My Study Archive")
    assert cells[1:3] == ["archive", "Online"]
    # free space moves while other programs write: the same figure, give or take
    assert re.fullmatch(r"\d{1,3}(,\d{3})*", cells[5]), cells
    days_left = storages["My Study Archive"]["days_left"]
    assert int(cells[5].replace(",", "")) == pytest.approx(days_left, rel=0.1)


def test_growth_is_averaged_by_the_date_studies_were_stored(home, run, tmp_path):
    files = imported(run, tmp_path)
    stored = sum(f.stat().st_size for f in files)
    later = time.time() + 40 * 86400  # forty days after the import
    with Vault.open(home / "studyvault.toml") as vault:
        growth = observe(vault, months=3, now=later)
        quiet = observe(vault, months=1, now=time.time() + 70 * 86400)
    assert sum(m.studies for m in growth.months) == 3
    assert growth.bytes == stored
    assert growth.days == pytest.approx(40, abs=0.01)
    assert growth.bytes_per_day == pytest.approx(stored / 40, rel=1e-3)
    assert all(s.days_left is not None and s.days_left > 0 for s in growth.storages)
    # nothing stored in the last month: no growth, never full
    assert quiet.bytes == 0 and quiet.bytes_per_day == 0
    assert [s.days_left for s in quiet.storages] == [None]


def test_a_new_vault_shows_no_growth_and_never_full(home, run):
    result = run("estimate")
    assert result.code == 0, result.err
    assert "There is no study index yet: no observed growth to show." in result.out
    assert not (home / "index").exists()  # estimate created none

    assert run("studies").code == 0  # opens (creates) the empty index
    out = run("estimate").out
    assert row(out, time.strftime("%Y-%m"))[1:] == ["0", "0 B"]
    assert "Growth: 0 B a month, 0 B a day, 0 B a year" in out
    assert row(out, "Image Center Storage")[5] == "never"
