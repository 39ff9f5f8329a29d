"""The weekly schedule window of a storage task: days of the week plus an hours window.

A window *starts* on each listed day at its start time and lasts until its end time,
which is on the next day when the window crosses midnight: ``Sa,Su 22:00-04:00``
opens Saturday and Sunday at 22:00, so Monday 02:00 is inside (the Sunday window) and
Saturday 02:00 is not (Friday is not listed). Equal start and end (``00:00-00:00``)
means 24 hours. Each occurrence is half-open: it contains its start, not its end.

Every moment is a naive local (wall-clock) :class:`~datetime.datetime` passed in by the
caller, so the clock can be injected in tests; :func:`now` is the default clock. On the
night a DST change skips or repeats an hour, wall-clock arithmetic can be off by that
hour: a caller that sleeps until :meth:`Window.next_start` should re-check the clock
when it wakes rather than trust the sleep length.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta

import msgspec

__all__ = ["DAY_ABBREVIATIONS", "Window", "now"]

#: Two-letter day abbreviations in week order; index = :meth:`datetime.weekday`.
DAY_ABBREVIATIONS: tuple[str, ...] = ("Mo", "Tu", "We", "Th", "Fr", "Sa", "Su")

_FULL_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_DAY_NAMES: dict[str, int] = {}
for _index, _full in enumerate(_FULL_NAMES):
    _DAY_NAMES[_full] = _index
    _DAY_NAMES[_full[:2]] = _index
    _DAY_NAMES[_full[:3]] = _index
_DAY_NAMES.update({"tues": 1, "weds": 2, "thur": 3, "thurs": 3})
_EVERY_DAY = ("daily", "every day", "everyday", "all")

_TIME = re.compile(r"(\d{1,2}):(\d{2})")
_ONE_DAY = timedelta(days=1)
_WEEK = tuple(range(7))


def now() -> datetime:
    """Return the current naive local time: the default clock for schedule checks."""
    return datetime.now()


class Window(msgspec.Struct, frozen=True, kw_only=True):
    """A weekly schedule window.

    :param days: weekdays on which the window starts, sorted and unique
        (0 = Monday … 6 = Sunday, as :meth:`datetime.weekday`).
    :param start: time of day at which the window opens.
    :param end: time of day at which it closes; at or before ``start`` means the next
        day (``start == end`` is a 24-hour window).
    """

    days: tuple[int, ...]
    start: time
    end: time

    def __post_init__(self) -> None:
        if not self.days:
            raise ValueError("a schedule window needs at least one day")
        if list(self.days) != sorted(set(self.days)) or not set(self.days) <= set(_WEEK):
            raise ValueError(f"window days {self.days!r} must be sorted unique weekdays 0-6")
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("window times are naive local times (no tzinfo)")

    # -- parsing and writing back --------------------------------------------------

    @classmethod
    def parse(cls, days: str | Sequence[str] | None, hours: str | None) -> Window | None:
        """Parse a task's ``days`` and ``hours`` settings.

        :param days: ``"Sa,Su"``, ``"Mo-Fr"``, ``"Monday, Wed"``, ``"daily"`` or a list
            of such items; ``None`` means every day.
        :param hours: ``"HH:MM-HH:MM"`` (24-hour; ``24:00`` is accepted as an end);
            ``None`` means the whole day.
        :returns: the window, or ``None`` when both are ``None`` (the task is unscheduled).
        :raises ValueError: with a one-line message naming the bad value.
        """
        if days is None and hours is None:
            return None
        day_numbers = _WEEK if days is None else _parse_days(days)
        start, end = (time(0), time(0)) if hours is None else _parse_hours(hours)
        return cls(days=day_numbers, start=start, end=end)

    def to_config(self) -> tuple[list[str], str]:
        """Return ``(days, hours)`` to write back to the config.

        For example ``(["Sa", "Su"], "22:00-04:00")``; ``Window.parse(*window.to_config())``
        gives back an equal window.
        """
        hours = f"{self.start:%H:%M}-{self.end:%H:%M}"
        return [DAY_ABBREVIATIONS[d] for d in self.days], hours

    def describe(self) -> str:
        """Return the window as the task list shows it: ``SaSu:10:00pm-4:00am``.

        Days are concatenated in week order; all seven days read ``Daily``.
        """
        names = "Daily" if self.days == _WEEK else "".join(DAY_ABBREVIATIONS[d] for d in self.days)
        return f"{names}:{_twelve_hour(self.start)}-{_twelve_hour(self.end)}"

    # -- questions about moments -----------------------------------------------------

    @property
    def duration(self) -> timedelta:
        """Length of one occurrence: up to 24 hours."""
        length = datetime.combine(date.min, self.end) - datetime.combine(date.min, self.start)
        return length if length > timedelta(0) else length + _ONE_DAY

    @property
    def always_open(self) -> bool:
        """Whether the window never closes (every day, 24 hours)."""
        return self.days == _WEEK and self.start == self.end

    def contains(self, moment: datetime) -> bool:
        """Tell whether ``moment`` is inside the window.

        :param moment: a naive local time.
        """
        return self._occurrence_containing(moment) is not None

    def next_start(self, after: datetime) -> datetime:
        """Return the first moment strictly after ``after`` at which an occurrence starts.

        Every listed day's start counts, even when it follows on from the previous
        day's occurrence without a gap (a 24-hour window on consecutive days).

        :param after: a naive local time.
        """
        for offset in range(8):
            day = after.date() + timedelta(days=offset)
            if day.weekday() in self.days:
                start = datetime.combine(day, self.start)
                if start > after:
                    return start
        raise AssertionError("unreachable: a non-empty window starts within 8 days")

    def current_end(self, moment: datetime) -> datetime | None:
        """Return when the window containing ``moment`` closes, or ``None`` when outside.

        Occurrences that follow on without a gap (24-hour windows on consecutive days)
        count as one window, so a run is not paused only to resume at the same instant.
        A window that never closes returns :attr:`datetime.max`.

        :param moment: a naive local time.
        """
        start = self._occurrence_containing(moment)
        if start is None:
            return None
        if self.always_open:
            return datetime.max
        end = start + self.duration
        # Only a 24-hour window ends exactly where the next day's occurrence starts.
        while self.start == self.end and end.weekday() in self.days:
            end += self.duration
        return end

    def _occurrence_containing(self, moment: datetime) -> datetime | None:
        """Return the start of the occurrence containing ``moment``, if any."""
        duration = self.duration
        for offset in (0, 1):  # an occurrence lasts at most a day: today's or yesterday's
            day = moment.date() - timedelta(days=offset)
            if day.weekday() in self.days:
                start = datetime.combine(day, self.start)
                if start <= moment < start + duration:
                    return start
        return None


def _parse_days(days: str | Sequence[str]) -> tuple[int, ...]:
    text = days if isinstance(days, str) else ",".join(days)
    numbers: set[int] = set()
    for item in (part.strip() for part in re.split(r"[,;]", text)):
        if item.lower() in _EVERY_DAY:
            numbers.update(_WEEK)
        elif "-" in item:
            first, _, last = (part.strip() for part in item.partition("-"))
            lo, hi = _day_number(first, text), _day_number(last, text)
            numbers.update((lo + step) % 7 for step in range((hi - lo) % 7 + 1))
        else:
            numbers.update(_day_number(name, text) for name in item.split())
    if not numbers:
        raise ValueError(f"days {text!r} names no day (use e.g. Mo,Tu,We,Th,Fr,Sa,Su)")
    return tuple(sorted(numbers))


def _day_number(name: str, text: str) -> int:
    try:
        return _DAY_NAMES[name.lower()]
    except KeyError:
        message = f"days {text!r}: unknown day {name!r} (use Mo,Tu,We,Th,Fr,Sa,Su)"
        raise ValueError(message) from None


def _parse_hours(hours: str) -> tuple[time, time]:
    first, dash, last = (part.strip() for part in hours.partition("-"))
    if not dash:
        message = f"hours {hours!r} is not a window: expected HH:MM-HH:MM, e.g. 22:00-04:00"
        raise ValueError(message)
    if not first or not last:
        missing = "start" if not first else "end"
        raise ValueError(f"hours {hours!r}: missing {missing} time (expected HH:MM-HH:MM)")
    return _parse_time(first, hours, allow_24=False), _parse_time(last, hours, allow_24=True)


def _parse_time(text: str, hours: str, *, allow_24: bool) -> time:
    match = _TIME.fullmatch(text)
    hour, minute = (int(match[1]), int(match[2])) if match else (-1, -1)
    if allow_24 and (hour, minute) == (24, 0):
        return time(0)
    if not (0 <= hour <= 23 and 0 <= minute <= 59):
        message = f"hours {hours!r}: {text!r} is not a time of day (HH:MM, 00:00-23:59)"
        raise ValueError(message)
    return time(hour, minute)


def _twelve_hour(moment: time) -> str:
    hour = moment.hour % 12 or 12
    return f"{hour}:{moment.minute:02d}{'am' if moment.hour < 12 else 'pm'}"
