"""The calendar of a forecast window as text, for prompts that read it (the `<WHEN>` slot, prompts/README.md).

The encoder sees time of day and day of week as numbers; public holidays it cannot see. A prompt can tell the
language model the date of the forecast and which holidays fall on the forecast days and on the days the period
context comes from (one day and one week earlier), where the history is not a guide to the future.

Calendars (`CityData.holidays`): "US" is pandas' US federal calendar (the days federal offices close, one name per
day, e.g. Independence Day on Friday 3 July 2020 when the 4th is a Saturday); any other country code the `holidays`
package knows ("AU", "IT", "CN", "GB", ...) is its national public holidays, observed days included, named in English
where the package has an English translation; "AU-VIC" adds the holidays of one subdivision (state, province).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from stllm.data.city import DataError


def _us_federal(first, last) -> dict:
    from pandas.tseries.holiday import USFederalHolidayCalendar
    names = USFederalHolidayCalendar().holidays(first, last, return_name=True)
    return {day.date(): str(name) for day, name in names.items()}


def _country(calendar: str, city: str):
    """A function (first day, last day) -> {date: name} from the `holidays` package for "CC" or "CC-SUBDIV"."""
    try:
        import holidays
    except ImportError as e:
        raise DataError(f"{city}: CityData.holidays is {calendar!r}, which needs the `holidays` package "
                        "(pip install 'holidays>=0.50')") from e
    code, _, subdiv = calendar.partition("-")
    known = holidays.list_supported_countries()
    if code not in known:
        examples = [c for c in ("AU", "CN", "DE", "FR", "GB", "IT", "JP", "US") if c in known]
        raise DataError(f"{city}: CityData.holidays is {calendar!r}, an unknown holiday calendar; known: "
                        f"'US' (pandas' federal calendar) and the country codes of the `holidays` package, e.g. "
                        f"{examples} (all: holidays.list_supported_countries()), optionally with a subdivision "
                        "('AU-VIC'), or '' for none")
    if subdiv and subdiv not in known[code]:
        raise DataError(f"{city}: CityData.holidays is {calendar!r}, but {code} has no subdivision {subdiv!r}; "
                        f"its subdivisions are {list(known[code])[:12]}, or give {code!r} alone")
    supported = holidays.country_holidays(code).supported_languages
    language = next((x for x in (f"en_{code}", "en_US", "en_GB") if x in supported), None)

    def names(first, last) -> dict:
        days = holidays.country_holidays(code, subdiv=subdiv or None, years=range(first.year, last.year + 1),
                                         language=language)
        return {day: str(name) for day, name in sorted(days.items()) if first.date() <= day <= last.date()}
    return names


# CityData.holidays -> a function (first day, last day) -> {date: holiday name}; other codes go to `holidays`
CALENDARS = {"US": _us_federal}
LAGS = {"day": (1, "One day earlier"), "week": (7, "One week earlier")}


def holiday_names(calendar: str, timestamps: np.ndarray, city: str = "city") -> dict:
    """{date: name} of the public holidays between the first and the last timestamp (plus a week of margin);
    empty for calendar ''. An unknown calendar is an error that names a few known ones."""
    if not calendar:
        return {}
    names = CALENDARS.get(calendar) or _country(calendar, city)
    first = pd.Timestamp(timestamps[0]) - pd.Timedelta(days=8)
    last = pd.Timestamp(timestamps[-1]) + pd.Timedelta(days=8)
    return names(first, last)


def window_text(target_times: np.ndarray, holidays: dict | None, periods=("day", "week")) -> str:
    """One sentence per fact, e.g. 'Forecast from Thursday 26 November 2020, 14:00. Holiday in the forecast:
    Thanksgiving Day. One day earlier: no holiday. One week earlier: no holiday.'

    target_times: the window's target timestamps. holidays: {date: name} from `holiday_names`, or None when the
    city has no holiday calendar (then only the date is given). periods: the period context's lags.
    """
    start = pd.Timestamp(target_times[0])
    text = f"Forecast from {start.strftime('%A')} {start.day} {start.strftime('%B %Y, %H:%M')}."
    if holidays is None:
        return text
    days = _days(target_times)
    text += f" Holiday in the forecast: {_names(days, holidays)}."
    for period in periods:
        text += f" {LAGS[period][1]}: {_names(_earlier(days, period), holidays)}."
    return text


def holiday_flags(timestamps: np.ndarray, holidays: dict, periods=("day", "week")) -> np.ndarray:
    """[T, 1 + len(periods)] float32: 1 where the step's day is a holiday, then where the day one period earlier
    was one (the day the period context of that step comes from); the encoder's view of `window_text`."""
    days = list(pd.DatetimeIndex(timestamps).date)
    columns = [days] + [_earlier(days, period) for period in periods]
    return np.array([[d in holidays for d in column] for column in columns], np.float32).T


def holiday_group(target_times: np.ndarray, holidays: dict, periods=("day", "week")) -> str:
    """'holiday' when a forecast day is a holiday, 'after_holiday' when a day the period context comes from is
    one (the history then misleads), else 'other'. For breaking errors down (benchmarks/holiday_errors.py)."""
    days = _days(target_times)
    if any(d in holidays for d in days):
        return "holiday"
    earlier = [d for p in periods for d in _earlier(days, p)]
    return "after_holiday" if any(d in holidays for d in earlier) else "other"


def _days(target_times: np.ndarray) -> list:
    """The calendar days the window's targets fall on, in order."""
    return sorted({pd.Timestamp(t).date() for t in target_times})


def _earlier(days: list, period: str) -> list:
    """The days the period context of those days comes from."""
    return [d - pd.Timedelta(days=LAGS[period][0]) for d in days]


def _names(days, holidays: dict) -> str:
    found = list(dict.fromkeys(holidays[d].rstrip(".") for d in days if d in holidays))
    return ", ".join(found) if found else "no holiday"
