"""The progress meter: rate and time left from the work done, a log line when due."""

import logging

import pytest

from splatclip.platform.progress import Meter, clock, pace


def test_pace_counts_only_this_process_work():
    assert pace(30, 100, 10, 4.0) == (5.0, 14.0)  # 20 units in 4 s; 70 left
    assert pace(10, 100, 10, 4.0) == (0.0, None)  # nothing done yet here: no estimate
    assert pace(120, 100, 0, 2.0)[1] == 0  # past the total (a total that grew): nothing left
    assert pace(5, 10, 0, 0.0) == (0.0, None)


@pytest.mark.parametrize("seconds, text", [(None, "?"), (0.4, "0 s"), (59.6, "1 min 00 s"), (185, "3 min 05 s"),
                                           (3720, "1 h 02 min")])
def test_clock(seconds, text):
    assert clock(seconds) == text


def test_meter_logs_every_update_at_debug_and_when_due_or_done_at_info(caplog):
    meter = Meter("train", "steps", 4, every=3600.0)
    with caplog.at_level(logging.DEBUG, logger="splatclip.progress"):
        for done in (1, 2, 3, 4):
            meter.update(done, note="x")
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.DEBUG] * 3 + [logging.INFO]  # the first 3 not due within the hour; the last done
    last = caplog.records[-1]
    assert last.progress["done"] == last.progress["total"] == 4 and last.progress["left"] == 0
    assert last.getMessage().startswith("train: 4 of 4 steps,") and last.getMessage().endswith("0 s left; x")
    assert meter.update(5, total=10).startswith("train: 5 of 10 steps")  # a total learned later
