"""The README works as written: its Python examples run, and its `pollinate` commands parse,
name files that exist, and (those that run offline in seconds) run."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pollinate.analytics.config import is_analytics
from pollinate.cli import build_parser, main
from tests.waiting import patience

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def readme_lines(blocks: list[str] | None = None) -> list[tuple[list[str], str]]:
    """Every `pollinate ...` line of the README's bash blocks as (argv, its comment), with
    continuation lines joined and leading VAR=value assignments dropped."""
    lines = []
    for block in bash_blocks() if blocks is None else blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]
            if words and words[0] == "pollinate":
                comment = line.partition(" #")[2].strip()
                lines.append((words, comment))
    return lines


def readme_commands() -> list[list[str]]:
    return [words for words, _ in readme_lines()]


def readme_commands_in(block: str) -> list[list[str]]:
    return [words for words, _ in readme_lines([block])]


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = cwd / "example.py"
    script.write_text(code)
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=patience(300),
    )


def test_readme_starts_with_the_quick_start():
    commands = [line.split("#")[0].strip() for line in bash_blocks()[0].splitlines()]
    assert commands[:2] == ["make run", "make test"]


@pytest.mark.slow
def test_python_example_runs(tmp_path):
    blocks = python_blocks()
    assert blocks, "README.md has no Python example"
    proc = run_python(blocks[0], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracies = [float(x) for x in re.findall(r"\d\.\d+", proc.stdout.splitlines()[-1])]
    assert len(accuracies) == 5
    assert accuracies[-1] > 0.6
    for name in ("history.json", "metrics.csv", "checkpoints/last.npz", "report.html"):
        assert (tmp_path / "runs" / "my-run" / name).is_file(), name


@pytest.mark.slow
def test_custom_client_example_runs(tmp_path):
    code = next(b for b in python_blocks() if "class SoftmaxClient" in b)
    assert "float32" in code and "int64" in code  # the data layout it reads is stated
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracies = [float(x) for x in re.findall(r"\d\.\d+", proc.stdout.splitlines()[-1])]
    assert len(accuracies) == 5 and accuracies[-1] > 0.8  # softmax regression on digits
    assert (tmp_path / "runs" / "softmax" / "report.html").is_file()


def _config_of(args):
    from pollinate import config
    from pollinate.analytics import config as analytics_config

    path = ROOT / args.config
    assert path.is_file(), f"{args.config} does not exist"
    if is_analytics(path):
        return analytics_config.load(path, args.overrides)
    return config.load(path, args.overrides)


def _output_of(argv: list[str]) -> str | None:
    """The run folder a README command writes (None: it writes none); fails if it does not
    parse or its config does not load."""
    if argv[1:] == ["--version"]:
        return None
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"the README's command does not parse: {shlex.join(argv)}")
    if args.command not in ("run", "partition", "server", "analyze", "client"):
        return None
    if args.command == "client" and args.config is None:
        return None
    if args.config is None:  # the default experiment
        from pollinate import config

        return config.load(None, args.overrides).output_dir.as_posix()
    return _config_of(args).output_dir.as_posix()


RUN_FOLDER = r"\b(runs/[\w.-]*\w)"


def test_every_readme_command_parses_and_names_configs_that_load():
    assert ["pollinate", "--version"] in readme_commands()
    outputs: set[str] = set()
    for block in bash_blocks():
        here = {out for argv in readme_commands_in(block) if (out := _output_of(argv))}
        outputs |= here
        if here:  # a folder named next to the commands is one they write
            named = set(re.findall(RUN_FOLDER, block))
            assert named <= here, f"{named - here} is not written by {here}: {block}"
    # every run folder the README names is written by one of its commands or examples
    outputs |= set(re.findall(r'output="(runs/[\w.-]+)"', README))
    named = set(re.findall(RUN_FOLDER, README))
    assert named <= outputs, f"run folders no README command writes: {named - outputs}"


def test_deployment_commands_name_files_that_pollinate_certs_and_keys_make(
    tmp_path, monkeypatch, capsys
):
    """The server machine runs `pollinate certs` and `keys`; a client machine holds the two
    files the README says to copy to it. Each command's files exist where it runs."""
    server, client = tmp_path / "server", tmp_path / "client"
    server.mkdir()
    client.mkdir()
    monkeypatch.chdir(server)
    commands = readme_commands()
    for argv in commands:
        if argv[1] in ("certs", "keys"):
            assert main(argv[1:]) == 0, shlex.join(argv)
    made = {p.name for p in (server / "certs").iterdir()}
    listed = re.search(r"`certs/` now holds (.*?)\. Copy", README, flags=re.S)
    assert listed is not None
    for name in re.findall(r"`([\w.<>-]+)`", listed.group(1)):
        assert name.replace("<id>", "0") in made, name
    copied = re.search(r"Copy `(\S+)` and `(\S+)` to client `<id>` only", README)
    assert copied is not None
    for name in copied.groups():
        shutil.copy(server / "certs" / name.replace("<id>", "0"), client)
    checked = 0
    for argv, comment in readme_lines():
        if argv[1] not in ("server", "client", "status"):
            continue
        args = build_parser().parse_args(argv[1:])
        if argv[1] == "status":  # it runs anywhere: the README says where
            assert "server machine" in comment or "client" in comment, shlex.join(argv)
        here = server if argv[1] == "server" or "server machine" in comment else client
        files = [getattr(args, flag, None) for flag in ("ca", "key", "cert", "allow_list")]
        if args.certs:
            assert (here / args.certs).is_dir(), shlex.join(argv)
            defaults = {"server": ["server.crt", "server.key", "allow-list.txt"]}
            files += [f"{args.certs}/{n}" for n in defaults.get(args.command, ["ca.crt"])]
            if getattr(args, "client_id", None) is not None and not args.key:
                files.append(f"{args.certs}/client-{args.client_id}.key")
        for name in filter(None, files):
            assert (here / name).is_file(), f"{shlex.join(argv)}: {name} is not on that machine"
            checked += 1
    assert checked >= 6
    capsys.readouterr()


# The README's commands that run offline in seconds, run as written (in this order).
AS_WRITTEN = [
    "pollinate --version",
    "pollinate partition examples/digits-noniid.toml",
    "pollinate run examples/digits-noniid.toml --set run.rounds=5"
    " --set simulation.backend=sequential",
    "pollinate report runs/digits-noniid",
    "pollinate run examples/fedbuff.toml",
    "pollinate run examples/digits-conditions.toml --set run.rounds=3",
    "pollinate analyze examples/diabetes-analytics.toml",
    "pollinate certs certs --host server.example.org --host 127.0.0.1",
    "pollinate keys certs 0 1",
]


@pytest.mark.slow
def test_readme_commands_that_run_offline_run_as_written(tmp_path):
    commands = [shlex.join(argv) for argv in readme_commands()]
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for command in AS_WRITTEN:
        assert command in commands, f"the README no longer has: {command}"
        argv = shlex.split(command)
        proc = subprocess.run(
            [sys.executable, "-m", "pollinate.cli", *argv[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=patience(600),
        )
        assert proc.returncode == 0, f"{command}:\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, command
    assert (tmp_path / "runs" / "digits-noniid" / "partitions.png").is_file()
    assert (tmp_path / "runs" / "digits-noniid" / "report.html").is_file()
    conditions = json.loads((tmp_path / "runs/digits-conditions/history.json").read_text())
    assert all("environment" in r for r in conditions["rounds"])
    assert (tmp_path / "runs" / "diabetes-analytics" / "analytics.json").is_file()
    assert (tmp_path / "runs" / "digits-fedbuff" / "accuracy_time.png").is_file()
    assert (tmp_path / "certs" / "allow-list.txt").read_text().count("\n") == 2
