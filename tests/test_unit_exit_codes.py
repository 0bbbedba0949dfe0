"""README.md's exit-code tables say exactly what rmemfs/exits.py says, command by command."""
from __future__ import annotations

import re
from pathlib import Path

from rmemfs.exits import CTL, MOUNT, RECOVER, STANDBY, TABLE, codes_of

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def readme_table() -> dict[str, set[int]]:
    """The codes README's table lists for rmemfs, rmemfs-recover and rmemfs-standby ('—': not this command)."""
    section = README[README.index("### Exit codes"):]
    commands = (MOUNT, RECOVER, STANDBY)
    documented: dict[str, set[int]] = {c: set() for c in commands}
    for line in section.splitlines()[1:]:
        if line.startswith("##"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not cells[0].isdigit():
            continue
        assert len(cells) == 1 + len(commands), line
        for command, cell in zip(commands, cells[1:], strict=True):
            if cell not in ("—", "-", ""):
                documented[command].add(int(cells[0]))
    return documented


def readme_ctl_codes() -> set[int]:
    sentence = re.search(r"`rmemfs-ctl`: (.*?)\. Every failure", README, re.S)
    assert sentence, "README lost its rmemfs-ctl exit-code sentence"
    return {int(n) for n in re.findall(r"(?:^|, )(\d+) ", sentence.group(1))}


def test_readme_tables_match_the_exit_code_table() -> None:
    documented = readme_table()
    for command in (MOUNT, RECOVER, STANDBY):
        assert documented[command] - {0} == set(codes_of(command)), command
    assert readme_ctl_codes() - {0} == set(codes_of(CTL))


def test_codes_are_unique() -> None:
    codes = [e.code for e in TABLE]
    assert len(codes) == len(set(codes))


def test_every_typed_error_has_an_exit_code() -> None:
    """Each CommandError type the library raises maps to a code of exits.TABLE (cli/common.EXIT_OF)."""
    from rmemfs import errors
    from rmemfs.cli.common import EXIT_OF, exit_code
    from rmemfs.exits import EXIT_ERROR, TABLE

    def subclasses(kind: type) -> list[type]:
        return [s for c in kind.__subclasses__() for s in (c, *subclasses(c))]

    known = {e.code for e in TABLE}
    typed = [k for k in subclasses(errors.CommandError) if k is not errors.QuietError
             and k is not errors.RecoveryError]
    assert len(typed) >= 15
    for kind in typed:
        code = exit_code(kind("x"))
        assert code != EXIT_ERROR and code in known, kind.__name__
    assert len({code for _, code in EXIT_OF}) == len(EXIT_OF)   # no two types share a code
