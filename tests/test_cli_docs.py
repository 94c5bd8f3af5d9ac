"""The CLI reference (docs/cli.md) is generated from the code and must be current."""

import importlib.util
from pathlib import Path

from maskpack.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _gen():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "tools" / "gen_cli_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_command_is_documented_and_docs_are_current():
    text = (ROOT / "docs" / "cli.md").read_text()
    for name in ("train", "eval", "pack", "unpack", "inspect", "verify", "bench", "cascade"):
        assert name in main.commands, name
        assert f"## maskpack {name}\n" in text, name
    assert text == _gen().render(), "docs/cli.md is stale: run python tools/gen_cli_docs.py"


def test_every_command_help_has_an_example():
    from click.testing import CliRunner

    for name in main.commands:
        out = CliRunner().invoke(main, [name, "--help"]).output
        assert "Example" in out, name
