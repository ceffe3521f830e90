"""The README is the newcomer's contract: its config table and test command must stay true."""

from pathlib import Path

from disposabledisco.config import load_schema, reference_table

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
CI = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_config_table_is_the_schema_rendering():
    section = README.split("<!-- config-reference:begin -->\n")[1].split(
        "\n<!-- config-reference:end -->")[0]
    rows = [line for line in reference_table().splitlines() if line.startswith("|")]
    assert section.splitlines() == rows, "refresh README's table from reference_table()"


def test_every_schema_key_is_in_the_readme():
    for key in load_schema()["properties"]:
        assert f"`{key}`" in README, key


def test_ci_runs_the_readme_test_command():
    command = next(line.strip() for line in CI.splitlines() if "pytest" in line)
    assert command in README
