"""Write docs/cli.md from the CLI's own --help texts (so the docs always match the code).

    .venv/bin/python tools/gen_cli_docs.py          # rewrite docs/cli.md
    .venv/bin/python tools/gen_cli_docs.py --check  # exit 1 if docs/cli.md is stale

tests/test_cli_docs.py runs the check, so a changed option without regenerated docs fails CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

from click.testing import CliRunner

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"

INTRO = """# Command-line reference

Generated from each command's `--help` by `tools/gen_cli_docs.py`; do not edit by hand.
Every command exits non-zero with one `Error: ...` line on bad input.
"""


def render() -> str:
    from maskpack.cli import main

    runner = CliRunner()
    top = runner.invoke(main, ["--help"], prog_name="maskpack", terminal_width=100).output.rstrip()
    parts = [INTRO, "## maskpack\n", "```", top, "```\n"]
    for name in sorted(main.commands):
        out = runner.invoke(main, [name, "--help"], prog_name="maskpack", terminal_width=100).output.rstrip()
        parts += [f"## maskpack {name}\n", "```", out, "```\n"]
    return "\n".join(parts)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale: run python tools/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
