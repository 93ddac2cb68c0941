"""The README says what the pack has: every node in one node table, two set-up commands, the activate step."""

from __future__ import annotations

import re
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def _node_display_names() -> set[str]:
    names = set()
    for path in sorted((REPO / "nodes").glob("*.py")):
        if path.name != "testing.py":  # registered only for the tests
            names.update(re.findall(r'display_name="([^"]+)",\n\s+category=', path.read_text(encoding="utf-8")))
    return names


def test_every_node_is_in_one_unbroken_node_table():
    section = _section("Nodes")
    start = section.index("| node | what it does |")
    lines = section[start:].splitlines()
    table = []
    for line in lines:
        if not line.startswith("|"):
            break
        table.append(line)
    rest = "\n".join(lines[len(table) :])
    assert not re.search(r"^\| \*\*", rest, re.M), "a node row follows the table after a blank line: it is cut in two"
    listed = {name for row in table for name in re.findall(r"\*\*([^*]+)\*\*", row.split("|")[1])}
    nodes = _node_display_names()
    assert len(nodes) >= 13, nodes
    assert nodes <= listed, f"missing from the README node table: {sorted(nodes - listed)}"


def test_two_setup_commands_that_exist():
    block = _section("Two commands").split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["bash scripts/quickstart.sh", "bash .ci/run"]
    assert (REPO / "scripts" / "quickstart.sh").is_file() and (REPO / ".ci" / "run").is_file()


def test_readme_says_to_activate_the_venv_before_python_commands():
    toy = _section("Try it now: the embedded toy model")
    first_command = toy.split("```bash\n", 1)[1].splitlines()[0]
    assert first_command.startswith(". .venv/bin/activate")
    assert ". .venv/bin/activate" in _section("Two commands")


def test_install_lines_use_an_existing_requirements_file_and_a_real_python():
    section = _section("Install into an existing ComfyUI")
    assert "ComfyUI/python -m pip" not in section  # the old line that could not run
    lines = [line for line in section.splitlines() if "pip install -r" in line]
    assert any(
        line.startswith("../venv/bin/python -m pip install -r comfyui-bfs-layers/requirements.txt") for line in lines
    ), lines
    assert any(line.startswith("python_embeded\\python.exe -s -m pip install -r ") for line in lines), lines
    assert (REPO / "requirements.txt").is_file()
