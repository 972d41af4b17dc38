"""The command line: subcommand registry, help, and the demo at a small shape."""

from __future__ import annotations

import json

import pytest

from seg4diff_fast import cli, demo


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


def test_demo_small_shape_writes_json(tmp_path, monkeypatch, capsys):
    # The real demo is SD3-sized (N = 4096 + 154); the same code at a small shape keeps the test quick.
    monkeypatch.setattr(demo, "N_IMG", 256)
    monkeypatch.setattr(demo, "N_TXT", 10)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--image-size", "96"]) == 0
    record = json.loads((out / "demo.json").read_text())
    assert record["ok"] is True
    assert record["shape"]["N"] == 266
    assert record["max_abs_diff"]["maps"] <= record["tolerance"]["maps"]
    assert set(record["steps"]) >= {"joint_attention[torch]", "joint_attention[reference]"}
    assert "OK" in capsys.readouterr().out
