"""Shell completions and man pages: current with the app, complete, and clean for man(1) and the shells."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from protembed.cli import app
from protembed.registry import MODELS

REPO = Path(__file__).resolve().parents[1]
MAN, COMPLETIONS = REPO / "man", REPO / "completions"
BASH, ZSH, FISH = COMPLETIONS / "protembed.bash", COMPLETIONS / "_protembed", COMPLETIONS / "protembed.fish"
REGENERATE = "stale; run: python scripts/gen_docs.py"
# Requests a generated page may use; anything else at the start of a line is text that needed "\&".
MACROS = {"TH", "SH", "SS", "PP", "TP", "RS", "RE", "nf", "fi", "B", "BR", "nh", "ad"}


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _commands() -> dict[str, Any]:
    """The live app's commands by name ("" for the top level), independently of the generator."""
    group: Any = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="protembed")
    subs = {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}
    return {"": (group, ctx)} | {
        name: (cmd, cmd.context_class(cmd, info_name=name, parent=ctx))
        for name, cmd in subs.items()
        if cmd is not None and not cmd.hidden
    }


def _visible(cmd: Any, ctx: Any, kind: str) -> list[Any]:
    return [p for p in cmd.get_params(ctx) if p.param_type_name == kind and not getattr(p, "hidden", False)]


def _page(name: str) -> Path:
    return MAN / (f"protembed-{name}.1" if name else "protembed.1")


def _esc(text: str) -> str:
    return text.replace("-", "\\-")


# --- staleness -----------------------------------------------------------------------------------


def test_checked_in_files_match_a_fresh_generation(tmp_path: Path) -> None:
    assert gen.main(["--out", str(tmp_path)]) == 0
    fresh = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    ours = {p.relative_to(REPO) for d in (MAN, COMPLETIONS) for p in d.iterdir() if p.is_file()}
    assert ours == fresh, f"completions/ or man/ has extra or missing files: {REGENERATE}"
    for rel in sorted(fresh):
        assert (REPO / rel).read_text(encoding="utf-8") == (tmp_path / rel).read_text(encoding="utf-8"), (
            f"{rel} is {REGENERATE}"
        )


def test_check_mode_names_stale_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen.main(["--out", str(tmp_path)])
    assert gen.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "man" / "protembed.1").write_text("old\n")
    (tmp_path / "man" / "protembed-gone.1").write_text("a command that no longer exists\n")
    assert gen.main(["--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "stale: man/protembed.1" in err and "stale: man/protembed-gone.1" in err


def test_output_is_reproducible() -> None:
    first, second = gen.render(), gen.render()
    assert first == second
    for path, text in first.items():
        home = str(Path.home())
        assert str(REPO) not in text and (home == "/" or home not in text), f"{path} embeds a local path"
        assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), f"{path} embeds a date"


# --- man pages -----------------------------------------------------------------------------------


def test_man_pages_have_the_required_sections() -> None:
    main = _page("").read_text(encoding="utf-8")
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "ENVIRONMENT", "FILES", "EXIT STATUS",
                    "EXAMPLES"):  # fmt: skip
        assert f"\n.SH {section}\n" in main, section
    for var in ("HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN", "CUDA_VISIBLE_DEVICES", "RANK",
                "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # fmt: skip
        assert var in main.partition(".SH ENVIRONMENT")[2].partition(".SH FILES")[0], var
    exit_status = main.partition(".SH EXIT STATUS")[2].partition(".SH ")[0]
    for code in ("0", "1", "2", "130"):
        assert f".TP\n\\fB{code}\\fR\n" in exit_status, code
    assert "HDF5" in main.partition(".SH FILES")[2].partition(".SH ")[0]
    assert re.search(r'^\.TH PROTEMBED 1 "" "protembed \d', main, re.M), "no date; version in the footer"
    for name in _commands():
        page = _page(name).read_text(encoding="utf-8")
        for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS"):
            assert f"\n.SH {section}\n" in page, f"{_page(name).name}: {section}"


def test_man_pages_cover_every_command_argument_and_option() -> None:
    main = _page("").read_text(encoding="utf-8")
    for name, (cmd, ctx) in _commands().items():
        assert _page(name).is_file(), f"no page for {name}: {REGENERATE}"
        page = _page(name).read_text(encoding="utf-8")
        if name:
            assert f"\\fB{_esc(name)}\\fR" in main and f"protembed\\-{_esc(name)} (1)" in main, name
        for param in _visible(cmd, ctx, "option"):
            for opt in (*param.opts, *param.secondary_opts):
                assert f"\\fB{_esc(opt)}\\fR" in page, f"{_page(name).name} lacks {opt}: {REGENERATE}"
        for param in _visible(cmd, ctx, "argument"):
            metavar = param.metavar or param.name.upper()
            assert f"\\fI{_esc(metavar)}\\fR" in page, f"{_page(name).name} lacks {metavar}: {REGENERATE}"


def test_man_source_escapes_requests_and_hyphens() -> None:
    for path in sorted(MAN.glob("*.1")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.name}:{number}: {line}"
            assert not line.startswith("'"), f"unescaped leading ' (use \\&): {where}"
            if line.startswith('.\\"'):
                continue
            if line.startswith("."):
                assert line[1:].split(" ")[0] in MACROS, f"unknown request or unescaped leading '.': {where}"
            assert not re.search(r"(?<!\\)-", line), f"hyphen not escaped as \\-: {where}"
            assert line.strip() and line == line.rstrip(), f"blank line or trailing space: {where}"


def test_man_pages_lint_clean() -> None:
    groff, mandoc = shutil.which("groff"), shutil.which("mandoc")
    if not groff and not mandoc:
        pytest.skip("neither groff nor mandoc is installed (apt-get install groff-base or mandoc)")
    for path in sorted(MAN.glob("*.1")):
        if groff:
            run = subprocess.run([groff, "-man", "-ww", "-z", str(path)], capture_output=True, text=True)
            assert run.returncode == 0 and not run.stderr, f"groff on {path.name}:\n{run.stderr}"
        if mandoc:
            lint = [mandoc, "-Tlint", "-W", "warning", str(path)]
            run = subprocess.run(lint, capture_output=True, text=True)
            # The date is left empty on purpose: the pages must not change from one day to the next.
            report = [line for line in run.stdout.splitlines() if "missing date" not in line]
            assert not report, f"mandoc on {path.name}:\n" + "\n".join(report)


def test_examples_use_existing_commands_and_options() -> None:
    root = gen.read_app(app)
    known = {c.name: {n for p in c.options for n in (*p.names, *p.secondary)} for c in [root, *root.commands]}
    examples = [*gen.OVERVIEW, *(e for c in root.commands for e in c.examples)]
    for example in (e for e in examples if e.line):
        words = shlex.split(example.line)
        words = words[words.index("protembed") + 1 :]
        words = words[: words.index("|")] if "|" in words else words
        command = next((w for w in words if not w.startswith("-")), "")
        assert command in known, f"unknown command in example: {example.line}"
        for word in (w.split("=")[0] for w in words if w.startswith("-") and w != "-"):
            assert word in known[command] | known[""], f"unknown option {word} in example: {example.line}"


def test_flags_show_no_value_in_help() -> None:
    """An on/off flag (--json, --overwrite, -q) is shown without a `<bool>` value it does not take;
    only Typer's own options (--help, --install-completion, --show-completion) keep the label."""
    for command in ["", *(c.name for c in typer.main.get_command(app).commands.values())]:  # type: ignore[attr-defined]
        result = CliRunner().invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        flagged = [line for line in result.output.splitlines() if "<bool>" in line]
        typers = ("--help", "--install-completion", "--show-completion")
        assert all(any(name in line for name in typers) for line in flagged), (command, flagged)


# --- completions ---------------------------------------------------------------------------------


def test_completion_options_stay_in_help() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0
    assert "--install-completion" in result.output and "--show-completion" in result.output


def test_bash_completion_syntax() -> None:
    run = subprocess.run(["bash", "-n", str(BASH)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def _bash_complete(words: list[str], cwd: Path) -> list[str]:
    """COMPREPLY for COMP_WORDS=words (the last is the word being completed)."""
    script = (
        f"source {shlex.quote(str(BASH))}\n"
        f"COMP_WORDS=({' '.join(map(shlex.quote, words))}) COMP_CWORD={len(words) - 1}\n"
        '_protembed; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=cwd)
    assert run.returncode == 0, run.stderr
    return sorted(filter(None, run.stdout.splitlines()))


def test_bash_completion_completes_commands_options_choices_and_files(tmp_path: Path) -> None:
    (tmp_path / "proteins.fasta").write_text(">a\nMK\n")
    cmd, ctx = _commands()["export"]
    what = next(p for p in _visible(cmd, ctx, "option") if "--what" in p.opts)
    assert _bash_complete(["protembed", "exp"], tmp_path) == ["export"]
    assert _bash_complete(["protembed", "--deb"], tmp_path) == ["--debug"]
    assert "--output" in _bash_complete(["protembed", "embed", "--out"], tmp_path)
    choices = sorted(c.value for c in what.type_descriptor.choices)
    assert _bash_complete(["protembed", "export", "--what", ""], tmp_path) == choices
    assert _bash_complete(["protembed", "export", "--what", "=", ""], tmp_path) == choices
    assert _bash_complete(["protembed", "embed", "prot"], tmp_path) == ["proteins.fasta"]
    assert _bash_complete(["protembed", "embed", "-m", "x", "-o", "prot"], tmp_path) == ["proteins.fasta"]

    (tmp_path / "esm_ckpt").mkdir()  # a model is a registry name or a checkpoint folder, never a file
    assert _bash_complete(["protembed", "embed", "x.fa", "-m", "es"], tmp_path) == sorted(
        [n for n in MODELS if n.startswith("es")] + ["esm_ckpt"]
    )
    assert _bash_complete(["protembed", "download", "amp"], tmp_path) == ["amplify-120m", "amplify-350m"]
    assert _bash_complete(["protembed", "bench", "--model", "=", "p"], tmp_path) == []


@pytest.mark.parametrize("path", [BASH, ZSH])
def test_completion_functions_are_defined_once(path: Path) -> None:
    """A helper named like a command's function (`_protembed_models` for `models`) would replace it."""
    names = re.findall(r"^(\w+)\(\) \{", path.read_text(), flags=re.M)
    assert names and len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_zsh_completion_syntax() -> None:
    if not shutil.which("zsh"):
        pytest.skip("zsh is not installed, so completions/_protembed cannot be syntax-checked here")
    run = subprocess.run(["zsh", "-n", str(ZSH)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_fish_completion_syntax_and_behaviour() -> None:
    if not shutil.which("fish"):
        pytest.skip("fish is not installed, so completions/protembed.fish cannot be checked here")
    run = subprocess.run(["fish", "--no-execute", str(FISH)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    queries = "complete -C 'protembed exp'; complete -C 'protembed export --wh'"
    script = f"source {shlex.quote(str(FISH))}; {queries}"
    run = subprocess.run(["fish", "--no-config", "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert [line.split("\t")[0] for line in run.stdout.splitlines()] == ["export", "--what"]
    script = f"source {shlex.quote(str(FISH))}; complete -C 'protembed finetune flip-gb1 -m amplify'"
    run = subprocess.run(["fish", "--no-config", "-c", script], capture_output=True, text=True)
    assert [line.split("\t")[0] for line in run.stdout.splitlines()] == ["amplify-120m", "amplify-350m"]


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["embed", "--help"], ["bench", "--help"]])
def test_help_does_not_import_torch(argv: list[str]) -> None:
    """`--help` and `--version` answer in a fraction of a second: torch, h5py and the Hub client are
    imported only by the commands that run them."""
    code = (
        "import sys\n"
        "from protembed.cli import app\n"
        "try:\n"
        f"    app({argv!r})\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        "heavy = sorted(m for m in ('torch', 'h5py', 'huggingface_hub') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
