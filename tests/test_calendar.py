"""The forecast window's calendar as text (stllm.data.calendar), and how PreparedCity hands it to the model."""
import dataclasses

import numpy as np
import pandas as pd
import pytest

from stllm.data.calendar import holiday_group, holiday_names, window_text
from stllm.data.city import DataError
from stllm.data.prepared import PreparedCity


def hours(start: str, n: int = 12) -> np.ndarray:
    return pd.date_range(start, periods=n, freq="h").to_numpy()


US_2020 = holiday_names("US", hours("2020-01-01", 24 * 366))


def test_us_holidays_are_the_federal_days_observed():
    assert US_2020[pd.Timestamp("2020-11-26").date()] == "Thanksgiving Day"
    assert US_2020[pd.Timestamp("2020-07-03").date()] == "Independence Day"    # July 4 was a Saturday
    assert pd.Timestamp("2020-07-04").date() not in US_2020
    assert len([d for d in US_2020 if d.year == 2020]) == 10


def test_window_text_names_the_date_and_the_holidays_of_the_forecast_and_the_period_days():
    thanksgiving = hours("2020-11-26 14:00")               # targets Thu 14:00 .. Fri 01:00
    assert window_text(thanksgiving, US_2020) == (
        "Forecast from Thursday 26 November 2020, 14:00. Holiday in the forecast: Thanksgiving Day. "
        "One day earlier: Thanksgiving Day. One week earlier: no holiday.")   # Fri 00:00 - 1 day is Thanksgiving
    a_week_later = hours("2020-12-03 08:00")
    assert window_text(a_week_later, US_2020) == (
        "Forecast from Thursday 3 December 2020, 08:00. Holiday in the forecast: no holiday. "
        "One day earlier: no holiday. One week earlier: Thanksgiving Day.")
    assert window_text(a_week_later, US_2020, periods=["day"]).endswith("One day earlier: no holiday.")
    mlk = hours("2020-01-20 09:00")
    assert "Holiday in the forecast: Birthday of Martin Luther King, Jr. One day" in window_text(mlk, US_2020)


def test_holiday_groups_of_windows():
    assert holiday_group(hours("2020-11-25 20:00"), US_2020) == "holiday"          # runs into Thanksgiving
    assert holiday_group(hours("2020-11-27 06:00"), US_2020) == "after_holiday"    # yesterday was Thanksgiving
    assert holiday_group(hours("2020-12-03 06:00"), US_2020) == "after_holiday"    # a week after
    assert holiday_group(hours("2020-12-03 06:00"), US_2020, periods=["day"]) == "other"
    assert holiday_group(hours("2020-12-09 06:00"), US_2020) == "other"


def test_without_a_calendar_only_the_date_is_given_and_unknown_calendars_are_errors():
    assert window_text(hours("2020-11-26 14:00"), None) == "Forecast from Thursday 26 November 2020, 14:00."
    assert holiday_names("", hours("2020-11-26")) == {}
    with pytest.raises(DataError, match="my-city: CityData.holidays is 'CN'.*known: \\['US'\\]"):
        holiday_names("CN", hours("2020-11-26"), "my-city")


def test_batches_carry_one_calendar_text_per_window(tiny_city, tiny_config):
    cfg = tiny_config()
    city = dataclasses.replace(tiny_city, holidays="US")
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    starts = prep.splits["test"][:3]
    batch = prep.batch(starts)
    assert len(batch["window_text"]) == 3
    for s, text in zip(starts, batch["window_text"]):
        first = pd.Timestamp(city.timestamps[s])
        assert text.startswith(f"Forecast from {first.strftime('%A')} {first.day} ")
        assert "One week earlier:" in text
    plain = PreparedCity(tiny_city, cfg.data, cfg.encoder).batch(starts)["window_text"]
    assert all(t.endswith(":00.") for t in plain)           # no calendar: the date only
