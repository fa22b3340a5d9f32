"""The README tells the truth: its commands exist with the options shown, and the ones that need no
real weights or network run as shown (the main job against a local fake Hub serving a fixture as
esm2-8m)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from protembed.cli import app
from tests.hub_server import FakeHub, default_repos

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks() -> Iterator[tuple[str, str]]:
    """(language, text) of every fenced code block, in order."""
    lang, lines, inside = "", [], False
    for line in README.splitlines():
        if line.startswith("```"):
            if inside:
                yield lang, "\n".join(lines) + "\n"
            lang, lines, inside = line[3:].strip(), [], not inside
        elif inside:
            lines.append(line)


def shell_blocks() -> Iterator[str]:
    """Shell code blocks (```bash, or unlabelled) of the README."""
    for lang, text in code_blocks():
        if lang in ("bash", "sh", ""):
            yield text


def command_lines() -> list[str]:
    """Every shell command line of the README's code blocks, continuation lines joined."""
    lines: list[str] = []
    for block in shell_blocks():
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith(("#", "import ", "from ", "with ", "assert", ">>>")):
                lines.append(line)
    return lines


def protembed_invocations() -> list[list[str]]:
    """argv (after `protembed`) of every protembed call in the README (synopses included)."""
    calls = []
    for line in command_lines():
        for part in re.split(r"&&|\|(?![^\[]*\])", line):  # not the `|` inside [a | b]
            words = shlex.split(part.replace("$(which protembed)", "protembed"), posix=True)
            while words and "=" in words[0]:  # VAR=value prefixes
                words = words[1:]
            launched = bool(words) and words[0] in ("torchrun", "srun")
            if words and (words[0] == "protembed" or (launched and "protembed" in words)):
                calls.append([w.strip("[]") for w in words[words.index("protembed") + 1 :]])
    return calls


def test_the_two_setup_commands_come_first_and_match_ci() -> None:
    first = next(shell_blocks())
    commands = [c for c in (line.split(" #")[0].strip() for line in first.splitlines()) if c and c[0] != "#"]
    assert len(commands) == 2
    install_and_run, install_and_test = commands
    assert install_and_run.startswith("pip install .") and "protembed embed" in install_and_run
    assert "pip install" in install_and_test and install_and_test.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\npython -m pytest\n" in ci and "torch==2.13.0" in ci


def test_every_readme_command_and_option_exists() -> None:
    root = typer.main.get_command(app)
    commands = root.commands  # type: ignore[attr-defined]  # a click Group
    calls = protembed_invocations()
    assert len(calls) > 20
    for argv in calls:
        if not argv or argv[0].startswith("-"):
            assert all(a in ("--version", "--help", "--debug") for a in argv if a.startswith("-"))
            continue
        command = commands.get(argv[0])
        assert command is not None, f"README runs unknown command: protembed {' '.join(argv)}"
        known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
        for word in argv[1:]:
            if word.startswith("--"):
                assert word.split("=")[0] in known, f"README: protembed {argv[0]} has no option {word}"


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    server = FakeHub(default_repos()).start()
    yield server
    server.stop()


def run(cmd: str, cwd: Path, hub: FakeHub, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HOME=str(home), HF_ENDPOINT=hub.url, NO_PROXY="127.0.0.1,localhost")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_quick_start_runs_as_shown(hub: FakeHub, tmp_path: Path) -> None:
    (tmp_path / "tests" / "data").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "data" / "example.fasta", tmp_path / "tests" / "data")
    quick = next(b for b in shell_blocks() if "protembed models" in b and "example.fasta" in b)
    ran = 0
    for line in quick.splitlines():
        cmd = line.split(" # ")[0].strip()
        if not cmd or cmd.startswith("#") or cmd.startswith("pip install"):
            continue
        result = run(cmd, tmp_path, hub, tmp_path / "hf")
        assert result.returncode == 0, f"{cmd}\n{result.stderr}"
        ran += 1
        if cmd.startswith("python -c"):
            assert result.stdout.strip().startswith("(12, ")  # 12 proteins (fixture hidden size)
    assert ran == 3
    assert (tmp_path / "tests" / "data" / "example.h5").exists()
    version = run("protembed --version", tmp_path, hub, tmp_path / "hf")
    assert version.returncode == 0 and version.stdout.startswith("protembed ")
