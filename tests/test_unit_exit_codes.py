"""README.md's exit-code tables say exactly what rmemfs/exits.py says, command by command."""
from __future__ import annotations

import re
from pathlib import Path

from rmemfs.exits import CTL, MOUNT, RECOVER, TABLE, codes_of

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def readme_table() -> dict[str, set[int]]:
    """The codes README's table lists for rmemfs and rmemfs-recover ('—' means: not this command)."""
    section = README[README.index("### Exit codes"):]
    documented: dict[str, set[int]] = {MOUNT: set(), RECOVER: set()}
    for line in section.splitlines()[1:]:
        if line.startswith("##"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].isdigit():
            continue
        for command, cell in zip((MOUNT, RECOVER), cells[1:], strict=True):
            if cell not in ("—", "-", ""):
                documented[command].add(int(cells[0]))
    return documented


def readme_ctl_codes() -> set[int]:
    sentence = re.search(r"`rmemfs-ctl`: (.*?)\. Every failure", README, re.S)
    assert sentence, "README lost its rmemfs-ctl exit-code sentence"
    return {int(n) for n in re.findall(r"(?:^|, )(\d+) ", sentence.group(1))}


def test_readme_tables_match_the_exit_code_table() -> None:
    documented = readme_table()
    for command in (MOUNT, RECOVER):
        assert documented[command] - {0} == set(codes_of(command)), command
    assert readme_ctl_codes() - {0} == set(codes_of(CTL))


def test_codes_are_unique() -> None:
    codes = [e.code for e in TABLE]
    assert len(codes) == len(set(codes))
