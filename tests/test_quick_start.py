"""The README's quick start is two commands, and CI runs exactly them (the set-up part of the first, the second)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_quick_start_is_two_commands_and_ci_runs_them():
    setup_and_run, tests = _quick_start_commands()
    assert "gan-pipeline run" in setup_and_run and "pytest" in tests
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert tests in ci
    ci_setup = next(line for line in ci if "pip install" in line).replace(" -q", "")
    assert setup_and_run.startswith(ci_setup + " && ")
