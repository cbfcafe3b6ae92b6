"""The forecast window's calendar as text (stllm.data.calendar), and how PreparedCity hands it to the model."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from stllm.data.calendar import holiday_flags, holiday_group, holiday_names, window_text
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
    with pytest.raises(DataError, match="my-city: CityData.holidays is 'XX', an unknown holiday calendar; "
                                        "known: 'US'.*'AU', 'CN'.*'AU-VIC'"):
        holiday_names("XX", hours("2020-11-26"), "my-city")
    with pytest.raises(DataError, match="'AU-XYZ', but AU has no subdivision 'XYZ'; its subdivisions are .*'VIC'"):
        holiday_names("AU-XYZ", hours("2020-11-26"), "my-city")


def test_other_countries_come_from_the_holidays_package_in_english():
    year = hours("2021-01-01", 24 * 365)
    au, vic = holiday_names("AU", year), holiday_names("AU-VIC", year)
    day = lambda text: pd.Timestamp(text).date()
    assert au[day("2021-01-26")] == "Australia Day" and au[day("2021-04-25")] == "ANZAC Day"
    assert day("2021-11-02") not in au and vic[day("2021-11-02")] == "Melbourne Cup Day"   # a Victorian holiday
    assert set(au) < set(vic)
    it, cn = holiday_names("IT", year), holiday_names("CN", year)
    assert it[day("2021-04-25")] == "Liberation Day" and it[day("2021-12-26")] == "Saint Stephen's Day"
    assert cn[day("2021-10-01")] == "National Day"                                           # not 国庆节
    assert "Holiday in the forecast: Melbourne Cup Day." in window_text(hours("2021-11-02 08:00"), vic)
    # "US" stays pandas' federal calendar: one name per closed day, not the holidays package's two
    assert US_2020[pd.Timestamp("2020-01-20").date()] == "Birthday of Martin Luther King, Jr."


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


def test_holiday_flags_mark_the_day_and_the_days_one_period_earlier():
    steps = pd.to_datetime(["2020-11-25 23:00", "2020-11-26 00:00", "2020-11-27 05:00", "2020-12-03 12:00",
                            "2020-12-04 12:00"]).to_numpy()
    flags = holiday_flags(steps, US_2020)            # columns: this day, one day earlier, one week earlier
    assert flags.dtype == np.float32 and flags.tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]
    assert holiday_flags(steps, US_2020, periods=["week"]).tolist() == [[0, 0], [1, 0], [0, 0], [0, 1], [0, 0]]


def test_holiday_features_reach_the_encoder_only_when_asked_for(tiny_city, tiny_config):
    from stllm.nn.encoder import STEncoder
    city = dataclasses.replace(tiny_city, holidays="US")
    plain_cfg, cfg = tiny_config(), tiny_config(["data.holiday_features=true"])
    plain, prep = PreparedCity(city, plain_cfg.data, plain_cfg.encoder), PreparedCity(city, cfg.data, cfg.encoder)
    assert plain.tf.shape[1] == 4 and prep.tf.shape[1] == 4 + 1 + 2
    assert torch.equal(prep.tf[:, :4], plain.tf)
    expected = holiday_flags(prep.timestamps, prep.holidays, prep.periods)
    assert expected.sum() > 0 and np.array_equal(prep.tf[:, 4:].numpy(), expected)   # the fixture spans a holiday

    torch.manual_seed(0)
    enc = STEncoder(cfg.encoder, cfg.data, city.n_channels, prep.n_exog).eval()
    batch = prep.batch(prep.splits["train"][:4])
    flipped = dict(batch, tf_out=batch["tf_out"].clone())
    flipped["tf_out"][:, :, 4] = 1 - flipped["tf_out"][:, :, 4]          # "the forecast day is (not) a holiday"
    assert not torch.allclose(enc(batch), enc(flipped))                   # the period tokens read it



def test_holiday_features_on_a_city_without_a_calendar_warn_and_know_no_holidays(tiny_city, tiny_config):
    cfg = tiny_config(["data.holiday_features=true"])
    with pytest.warns(UserWarning, match=r"data.holiday_features is on.*no holiday calendar.*holidays=XX"):
        prep = PreparedCity(tiny_city, cfg.data, cfg.encoder)             # tiny_city has no calendar
    assert prep.tf.shape[1] == 4 + 1 + 2 and not prep.tf[:, 4:].any()     # same features, every flag 0
    assert prep.holidays is None                                          # prompts give the date only
    assert prep.batch(prep.splits["test"][:1])["window_text"][0].endswith(":00.")
