"""The delay line of pserver.netdelay (the decision alone; the queue is exercised by
tests/cluster/test_netns.py)."""

import pytest

from pserver.netdelay import DelayLine


def test_packets_leave_in_arrival_order_once_their_delay_has_passed():
    line = DelayLine(0.005)
    line.arrive("a", 10.000)
    line.arrive("b", 10.002)
    assert line.due(10.004) == [] and line.wait_for(10.004) == pytest.approx(0.001)
    assert line.due(10.005) == ["a"]
    assert line.due(10.010) == ["b"] and line.wait_for(10.010, idle=0.2) == 0.2


def test_a_negative_delay_is_refused():
    with pytest.raises(ValueError, match="delay must be >= 0"):
        DelayLine(-1)
