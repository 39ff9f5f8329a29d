"""The weekly schedule window of a storage task (``--days Sa,Su --hours 22:00-04:00``)."""

from __future__ import annotations

from datetime import datetime, time, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from studyvault.window import Window, now

# A reference week: Monday 2024-06-03 … Sunday 2024-06-09.
MO, TU, WE, TH, FR, SA, SU = (datetime(2024, 6, 3 + offset) for offset in range(7))
NEXT_MO = datetime(2024, 6, 10)


def at(day: datetime, hhmm: str) -> datetime:
    hour, minute = map(int, hhmm.split(":"))
    return day.replace(hour=hour, minute=minute)


def window(days: str | list[str] | None, hours: str | None) -> Window:
    parsed = Window.parse(days, hours)
    assert parsed is not None
    return parsed


WEEKEND_NIGHTS = window("Sa,Su", "22:00-04:00")
FRIDAY_NIGHT = window("Fr", "22:00-04:00")
SUNDAY_NIGHT = window("Su", "22:00-04:00")
OFFICE_HOURS = window("Mo-Fr", "08:00-18:00")


@pytest.mark.parametrize(
    ("win", "moment", "inside"),
    [
        # Sa,Su 22:00-04:00 starts on Saturday or Sunday evening
        (WEEKEND_NIGHTS, at(FR, "23:00"), False),
        (WEEKEND_NIGHTS, at(SA, "02:00"), False),  # would need Friday listed
        (WEEKEND_NIGHTS, at(SA, "21:59"), False),
        (WEEKEND_NIGHTS, at(SA, "22:00"), True),  # the start is inside
        (WEEKEND_NIGHTS, at(SU, "00:00"), True),
        (WEEKEND_NIGHTS, at(SU, "03:59"), True),
        (WEEKEND_NIGHTS, at(SU, "04:00"), False),  # the end is not
        (WEEKEND_NIGHTS, at(SU, "12:00"), False),
        (WEEKEND_NIGHTS, at(SU, "23:59"), True),
        (WEEKEND_NIGHTS, at(NEXT_MO, "00:00"), True),
        (WEEKEND_NIGHTS, at(NEXT_MO, "02:00"), True),  # the window that began Sunday
        (WEEKEND_NIGHTS, at(MO, "02:00"), True),  # ... of the week before
        (WEEKEND_NIGHTS, at(NEXT_MO, "04:00"), False),
        (WEEKEND_NIGHTS, at(NEXT_MO, "22:00"), False),
        # a single Sunday night carries across the week boundary
        (SUNDAY_NIGHT, at(SU, "23:59"), True),
        (SUNDAY_NIGHT, at(NEXT_MO, "00:01"), True),
        (SUNDAY_NIGHT, at(NEXT_MO, "03:59"), True),
        (SUNDAY_NIGHT, at(SA, "23:00"), False),
        (SUNDAY_NIGHT, at(SU, "02:00"), False),
        # a Friday-only night belongs to Friday's start, not Friday's morning
        (FRIDAY_NIGHT, at(FR, "03:00"), False),
        (FRIDAY_NIGHT, at(FR, "22:30"), True),
        (FRIDAY_NIGHT, at(SA, "03:00"), True),
        (FRIDAY_NIGHT, at(SA, "22:30"), False),
        # seconds and microseconds count
        (FRIDAY_NIGHT, at(SA, "03:59").replace(second=59, microsecond=999999), True),
        (FRIDAY_NIGHT, at(FR, "21:59").replace(second=59, microsecond=999999), False),
        # a same-day window
        (OFFICE_HOURS, at(MO, "08:00"), True),
        (OFFICE_HOURS, at(FR, "17:59"), True),
        (OFFICE_HOURS, at(FR, "18:00"), False),
        (OFFICE_HOURS, at(SA, "09:00"), False),
        (OFFICE_HOURS, at(WE, "07:59"), False),
        # equal start and end is 24 hours from the start
        (window("We", "00:00-00:00"), at(WE, "00:00"), True),
        (window("We", "00:00-00:00"), at(WE, "23:59"), True),
        (window("We", "00:00-00:00"), at(TH, "00:00"), False),
        (window("We", "00:00-00:00"), at(TU, "23:59"), False),
        (window("We", "12:00-12:00"), at(TH, "11:59"), True),
        (window("We", "12:00-12:00"), at(WE, "11:59"), False),
        # hours without days: every day; days without hours: the whole day
        (window(None, "01:00-02:00"), at(TH, "01:30"), True),
        (window(None, "01:00-02:00"), at(SU, "01:30"), True),
        (window(None, "01:00-02:00"), at(SU, "02:30"), False),
        (window("Tu", None), at(TU, "00:00"), True),
        (window("Tu", None), at(TU, "23:59"), True),
        (window("Tu", None), at(WE, "00:00"), False),
        # a Sunday night window across a year boundary
        (SUNDAY_NIGHT, datetime(2023, 12, 31, 23, 0), True),
        (SUNDAY_NIGHT, datetime(2024, 1, 1, 3, 0), True),
        (SUNDAY_NIGHT, datetime(2024, 1, 1, 5, 0), False),
    ],
)
def test_window_contains_moment(win: Window, moment: datetime, inside: bool) -> None:
    assert win.contains(moment) is inside
    assert (win.current_end(moment) is not None) is inside


@pytest.mark.parametrize(
    ("win", "after", "expected"),
    [
        (WEEKEND_NIGHTS, at(MO, "10:00"), at(SA, "22:00")),
        (WEEKEND_NIGHTS, at(SA, "21:59"), at(SA, "22:00")),
        (WEEKEND_NIGHTS, at(SA, "22:00"), at(SU, "22:00")),  # strictly after
        (WEEKEND_NIGHTS, at(SA, "23:00"), at(SU, "22:00")),
        (WEEKEND_NIGHTS, at(SU, "22:00"), at(NEXT_MO, "22:00") + timedelta(days=5)),
        (WEEKEND_NIGHTS, at(NEXT_MO, "01:00"), at(NEXT_MO, "22:00") + timedelta(days=5)),
        (SUNDAY_NIGHT, at(SU, "22:00"), at(SU, "22:00") + timedelta(days=7)),
        (SUNDAY_NIGHT, at(SU, "21:00"), at(SU, "22:00")),
        (FRIDAY_NIGHT, at(SA, "03:00"), at(FR, "22:00") + timedelta(days=7)),
        (OFFICE_HOURS, at(FR, "18:00"), at(NEXT_MO, "08:00")),
        (OFFICE_HOURS, at(TU, "07:00"), at(TU, "08:00")),
        (OFFICE_HOURS, at(TU, "08:00"), at(WE, "08:00")),
        (window(None, "00:00-00:00"), at(TH, "00:00"), at(FR, "00:00")),
        (SUNDAY_NIGHT, datetime(2023, 12, 31, 23, 0), datetime(2024, 1, 7, 22, 0)),
    ],
)
def test_next_start_across_the_week(win: Window, after: datetime, expected: datetime) -> None:
    assert win.next_start(after) == expected


@pytest.mark.parametrize(
    ("win", "moment", "expected"),
    [
        (WEEKEND_NIGHTS, at(SA, "22:00"), at(SU, "04:00")),
        (WEEKEND_NIGHTS, at(SU, "23:59"), at(NEXT_MO, "04:00")),
        (WEEKEND_NIGHTS, at(MO, "03:00"), at(MO, "04:00")),
        (WEEKEND_NIGHTS, at(SA, "12:00"), None),
        (OFFICE_HOURS, at(WE, "12:00"), at(WE, "18:00")),
        (window("We", "00:00-00:00"), at(WE, "12:00"), at(TH, "00:00")),
        # 24-hour windows on consecutive days are one window, with no pause between
        (window("Fr-Su", "00:00-00:00"), at(FR, "09:00"), at(NEXT_MO, "00:00")),
        (window("Su-Mo", "20:00-20:00"), at(SU, "21:00"), at(NEXT_MO, "20:00") + timedelta(days=1)),
        (window("daily", "12:00-12:00"), at(TU, "13:00"), datetime.max),
        (window("Mo-Su", None), at(TU, "13:00"), datetime.max),
    ],
)
def test_current_end_is_when_a_scheduled_run_pauses(
    win: Window, moment: datetime, expected: datetime | None
) -> None:
    assert win.current_end(moment) == expected


@pytest.mark.parametrize(
    ("days", "hours", "text"),
    [
        ("Sa,Su", "22:00-04:00", "SaSu:10:00pm-4:00am"),
        ("Su,Sa", "22:00-04:00", "SaSu:10:00pm-4:00am"),
        (None, "22:00-04:00", "Daily:10:00pm-4:00am"),
        ("Mo,Tu,We,Th,Fr,Sa,Su", "22:00-04:00", "Daily:10:00pm-4:00am"),
        ("Mo-Fr", "08:30-18:05", "MoTuWeThFr:8:30am-6:05pm"),
        ("We", "00:00-12:00", "We:12:00am-12:00pm"),
        ("Fr", "12:30-23:59", "Fr:12:30pm-11:59pm"),
        ("Th", None, "Th:12:00am-12:00am"),
        ("sunday, MONDAY", "1:00-2:00", "MoSu:1:00am-2:00am"),
    ],
)
def test_describe_like_the_task_list(days: str | None, hours: str | None, text: str) -> None:
    assert window(days, hours).describe() == text


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        ("Sa,Su", (5, 6)),
        ("sa, SU", (5, 6)),
        ("Sat,Sun", (5, 6)),
        ("Saturday,Sunday", (5, 6)),
        ("Mon Wed", (0, 2)),
        ("Mo-Fr", (0, 1, 2, 3, 4)),
        ("Fr-Mo", (0, 4, 5, 6)),  # a range may wrap around the week's end
        ("Mo - We, Su", (0, 1, 2, 6)),
        ("Tues,Thurs", (1, 3)),
        ("Daily", (0, 1, 2, 3, 4, 5, 6)),
        (["Sa", "Su"], (5, 6)),
        ("Mo,Mo,Monday", (0,)),
    ],
)
def test_days_accept_abbreviations_names_and_ranges(
    days: str | list[str], expected: tuple[int, ...]
) -> None:
    assert window(days, "22:00-04:00").days == expected


@pytest.mark.parametrize(
    ("hours", "start", "end"),
    [
        ("22:00-04:00", time(22), time(4)),
        ("22:00 - 04:00", time(22), time(4)),
        ("9:05-17:30", time(9, 5), time(17, 30)),
        ("22:00-24:00", time(22), time(0)),
        ("00:00-00:00", time(0), time(0)),
    ],
)
def test_hours_parse(hours: str, start: time, end: time) -> None:
    parsed = window("Mo", hours)
    assert (parsed.start, parsed.end) == (start, end)


def test_no_days_and_no_hours_means_unscheduled() -> None:
    assert Window.parse(None, None) is None


@pytest.mark.parametrize(
    ("days", "hours", "named"),
    [
        ("Sa", "25:00-04:00", "25:00"),
        ("Sa", "10:00-10:61", "10:61"),
        ("Sa", "22:00", "22:00"),
        ("Sa", "22:00-", "22:00-"),
        ("Sa", "-04:00", "-04:00"),
        ("Sa", "24:00-04:00", "24:00"),
        ("Sa", "22h-04h", "22h"),
        ("Sa", "", "''"),
        ("Xx", "22:00-04:00", "Xx"),
        ("Sa,Xx", "22:00-04:00", "Xx"),
        ("Mo-Xx", "22:00-04:00", "Xx"),
        ("", "22:00-04:00", "''"),
        (" , ", "22:00-04:00", "' , '"),
    ],
)
def test_bad_values_are_named_in_one_line(days: str, hours: str, named: str) -> None:
    with pytest.raises(ValueError) as caught:
        Window.parse(days, hours)
    message = str(caught.value)
    assert named in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("days", "hours", "config"),
    [
        ("Sun,sat", "22:00-4:00", (["Sa", "Su"], "22:00-04:00")),
        (None, "01:00-02:00", (["Mo", "Tu", "We", "Th", "Fr", "Sa", "Su"], "01:00-02:00")),
        ("Fr", None, (["Fr"], "00:00-00:00")),
    ],
)
def test_to_config_writes_back_what_parse_reads(
    days: str | None, hours: str | None, config: tuple[list[str], str]
) -> None:
    parsed = window(days, hours)
    assert parsed.to_config() == config
    assert Window.parse(*parsed.to_config()) == parsed


def test_default_clock_is_naive_local_time() -> None:
    assert now().tzinfo is None


# -- properties ------------------------------------------------------------------------

MINUTES = st.integers(min_value=0, max_value=24 * 60 - 1)
windows = st.builds(
    lambda days, start, end: Window(
        days=tuple(sorted(days)),
        start=time(start // 60, start % 60),
        end=time(end // 60, end % 60),
    ),
    st.sets(st.integers(min_value=0, max_value=6), min_size=1),
    MINUTES,
    MINUTES,
)
moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1))


def contains_by_minute_of_week(win: Window, moment: datetime) -> bool:
    """An independent oracle: position in the week compared with each start, modulo a week."""
    week = 7 * 24 * 60
    position = moment.weekday() * 24 * 60 + moment.hour * 60 + moment.minute
    fraction = (moment.second * 1_000_000 + moment.microsecond) / 60_000_000
    length = win.duration.total_seconds() / 60
    for day in win.days:
        start = day * 24 * 60 + win.start.hour * 60 + win.start.minute
        if (position - start) % week + fraction < length:
            return True
    return False


@given(windows, moments)
def test_contains_agrees_with_minute_of_week(win: Window, moment: datetime) -> None:
    assert win.contains(moment) == contains_by_minute_of_week(win, moment)


@given(windows, moments)
def test_next_start_is_the_first_start_after(win: Window, moment: datetime) -> None:
    start = win.next_start(moment)
    assert start > moment
    assert start - moment <= timedelta(days=7)
    assert win.contains(start)
    assert start.weekday() in win.days and start.time() == win.start
    # no start lies between: the day's start before it is at or before `moment`
    earlier = [start - timedelta(days=n) for n in range(1, 8)]
    assert all(s <= moment for s in earlier if s.weekday() in win.days)


@given(windows, moments)
def test_current_end_closes_the_containing_window(win: Window, moment: datetime) -> None:
    end = win.current_end(moment)
    if not win.contains(moment):
        assert end is None
        return
    assert end is not None
    if win.always_open:
        assert end == datetime.max
        return
    assert end > moment
    assert not win.contains(end)
    assert win.contains(end - timedelta(microseconds=1))
    step = (end - moment) / 7
    assert all(win.contains(moment + step * n) for n in range(7))


@given(windows)
def test_config_round_trip(win: Window) -> None:
    assert Window.parse(*win.to_config()) == win
