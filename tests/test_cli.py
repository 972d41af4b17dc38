"""The command line: subcommand registry and help."""

from __future__ import annotations

import pytest

from seg4diff_fast import cli


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert "seg4diff-fast" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_every_registered_command_builds():
    parser = cli.build_parser()
    for name in cli.COMMANDS:
        args = parser.parse_args([name])
        assert callable(args._run)


# The demo itself (bundled scenes, overlays, per-block mIoU, core-op check) is tested in test_demo.py.
