"""The README is the newcomer's contract: its config table and test command must stay true."""

import re
from pathlib import Path

from disposabledisco.config import load_schema, reference_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
SETUP = (ROOT / "scripts" / "setup-and-run").read_text(encoding="utf-8")


def quick_start() -> list[str]:
    """The lines of README's first code block: the two quick-start commands."""
    block = README.split("```sh\n", 1)[1].split("```", 1)[0]
    return block.splitlines()


def test_readme_config_table_is_the_schema_rendering():
    section = README.split("<!-- config-reference:begin -->\n")[1].split(
        "\n<!-- config-reference:end -->")[0]
    rows = [line for line in reference_table().splitlines() if line.startswith("|")]
    assert section.splitlines() == rows, "refresh README's table from reference_table()"


def test_every_schema_key_is_in_the_readme():
    for key in load_schema()["properties"]:
        assert f"`{key}`" in README, key


def test_the_first_code_block_is_two_one_line_commands_demo_then_test():
    lines = quick_start()
    assert lines == ["./scripts/setup-and-run demo", "./scripts/setup-and-run test"]


def test_ci_runs_exactly_the_readme_test_command():
    commands = [line.strip() for line in CI.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == quick_start()[1], "CI's last command must be README's test command"
    assert not any(re.search(r"\b(pytest|pip|ruff)\b", line) for line in commands), \
        "CI must not test differently from README: change scripts/setup-and-run instead"


def test_the_test_command_lints_and_runs_the_whole_suite_listing_skips():
    test_part = SETUP.split('if [ "$what" = demo ]; then\n  exec', 1)[1]
    assert "python -m ruff check .\n" in test_part
    run = test_part.strip().splitlines()[-1]
    assert run == 'exec python -m pytest -q -rs "$@"', "no marker filter; skips with reasons"


def test_the_readme_test_section_shows_the_same_command():
    section = README.split("## Test it\n", 1)[1].split("\n## ", 1)[0]
    assert f"```sh\n{quick_start()[1]}\n```" in section
