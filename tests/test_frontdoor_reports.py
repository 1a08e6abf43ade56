"""Forked children's PROXY/TLS counts reach the server process (issue 21,
section 3): what cannot be (the report pipe is full) is counted and reported,
never silently dropped."""

import logging
import os

import pytest

from fastlisten._frontdoor import FrontDoor
from fastlisten.config import ListenConfig

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


def _door():
    return FrontDoor(ListenConfig(proxy_protocol="v1").proxy(),
                     None, 10.0, forking=True)


def _in_child(door, events):
    """Fork a child that records ``events`` proxy_accepted events, as the
    children of a forking server do, while this process reads nothing."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for _ in range(events):
                door._record("proxy_accepted")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.forks_beside_test_threads      # os.fork() beside pytest's watchdog
def test_a_few_reports_all_arrive():
    door = _door()
    try:
        _in_child(door, 3)
        counts = door.counters()
        assert counts["proxy_accepted"] == 3
        assert "reports_lost" not in counts
    finally:
        door.close()


@pytest.mark.forks_beside_test_threads
def test_reports_beyond_a_full_pipe_are_counted_and_reported(caplog):
    # More than the pipe holds (64 KiB, one byte each) while the server
    # process reads nothing: every event is either counted or reported lost.
    events = 70_000
    door = _door()
    try:
        _in_child(door, events)
        with caplog.at_level(logging.WARNING, logger="fastlisten"):
            counts = door.counters()
            again = door.counters()
        assert counts["proxy_accepted"] < events
        assert counts["proxy_accepted"] + counts["reports_lost"] == events
        assert again["reports_lost"] == counts["reports_lost"]
        warned = [r for r in caplog.records if "were lost" in r.getMessage()]
        assert len(warned) == 1, caplog.text      # once, not per counters() call
    finally:
        door.close()
