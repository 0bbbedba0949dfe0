"""Unit tests of what the commands share (rmemfs/cli/common.py, the -o parser)."""
from __future__ import annotations

import pytest

from rmemfs.cli.common import exit_code, take_options
from rmemfs.errors import UsageError
from rmemfs.exits import EXIT_USAGE
from rmemfs.options import parse_options


def test_take_options_takes_the_named_keys_and_keeps_the_rest_in_order() -> None:
    mine, rest = take_options(["port=0,fence_cmd=/bin/true", "allow_other,,dead_after=0.3", "fsid=x"],
                              ("fence_cmd", "dead_after"))
    assert mine == {"fence_cmd": "/bin/true", "dead_after": "0.3"}
    assert rest == ["port=0", "allow_other", "fsid=x"]


def test_take_options_keeps_everything_after_the_first_equals_sign() -> None:
    mine, rest = take_options(["fence_cmd=ssh a poweroff x=1"], ("fence_cmd",))
    assert mine == {"fence_cmd": "ssh a poweroff x=1"} and rest == []


@pytest.mark.parametrize("item", ["fence_cmd", "fence_cmd="])
def test_take_options_refuses_a_key_without_a_value(item: str) -> None:
    with pytest.raises(UsageError, match="option fence_cmd needs a value") as e:
        take_options(["port=0", item], ("fence_cmd",))
    assert exit_code(e.value) == EXIT_USAGE


@pytest.mark.parametrize("item,on", [("writeback_cache", True), ("writeback_cache=on", True),
                                     ("writeback_cache=off", False), ("allow_other=off", False)])
def test_a_flag_option_takes_on_or_off(item: str, on: bool) -> None:
    """``-o writeback_cache=off`` turned the cache on: a flag's value was ignored."""
    opts = parse_options([item])
    assert getattr(opts, item.split("=")[0]) is on
