"""The docs that are generated from or point into the code stay true to it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cli_guide_is_current() -> None:
    """docs/cli.md's option tables are generated from the config dataclasses: regenerate on change."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_cli_docs.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_local_links_and_images_exist() -> None:
    """Every relative link or image in README.md and docs/*.md names a file that is in the tree."""
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not missing, missing


def test_readme_set_up_is_two_commands_and_ci_runs_the_test_command() -> None:
    """README's "Set up" shows two one-line commands (the demo, the tests), and CI (.ci/run) runs the
    second exactly as written, so CI tests what a new user installs."""
    readme = (ROOT / "README.md").read_text()
    set_up = readme.split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^```\n(.*?)\n```$", set_up, flags=re.S | re.M)
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    assert "selkd-demo" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
