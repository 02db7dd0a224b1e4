"""Documentation that cannot drift: every `msrl …` command line shown in README.md and docs/ parses.

Each line that starts with `msrl ` in a fenced code block (` \\` continuations joined, a trailing `# comment`
dropped, nothing else changed) runs through `msrl.cli.main` exactly as the console script would, and stops
as soon as the verb's parser has parsed it: jsonargparse for `sample`, `evaluate`, `data`, …, LightningCLI's
parser for the training verbs (`-c` files read for real, nothing instantiated, so a checkpoint path that does
not exist here is fine). A renamed verb or option fails. The site itself (links, API symbols) is checked by
`make docs` (`mkdocs build --strict`); here only that the nav's pages exist and the version is the changelog's.
"""

from __future__ import annotations

import importlib
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningCLI

from msrl.cli import main
from tests.conftest import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "2>", "2>&1", "&>"}  # a command line ends at one


def command_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) for each line of a fenced code block that starts with `msrl `.

    Lines ending in ` \\` continue on the next; the command is what the shell would run, so the
    line number is the first line's.
    """
    commands: list[tuple[int, str]] = []
    fence: str | None = None
    pending: tuple[int, str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None:
            fence = match.group(1) if match else None
            continue
        if match and line.strip() == match.group(1) and match.group(1).startswith(fence):  # the closing fence
            fence, pending = None, None
            continue
        start, joined = pending if pending else (number, "")
        joined += line.strip()
        if joined.endswith("\\"):
            pending = (start, joined[:-1].rstrip() + " ")
            continue
        pending = None
        if joined.startswith("msrl "):
            commands.append((start, joined))
    return commands


def command_argv(command: str) -> list[str]:
    """The arguments after `msrl`, as the shell passes them: quotes removed, a `# comment` and what follows a
    shell operator (`| tee log`, `&& …`) left out."""
    words = shlex.split(command, comments=True)
    cut = next((i for i, word in enumerate(words) if word in SHELL_OPERATORS), len(words))
    return words[1:cut]


class Parsed(BaseException):  # not an Exception: msrl.cli.main catches those (ValueError, …) and exits
    """Raised when the verb's parser has parsed the whole command line, before anything runs."""


# LightningCLI's parsers, built once per CLI class and settings: building one takes longer than parsing with it.
_LIGHTNING_PARSERS: dict[tuple[Any, ...], ArgumentParser] = {}


@contextmanager
def parse_only() -> Iterator[None]:
    """Within: the first jsonargparse parse that completes (a verb's parser, LightningCLI's too) ends the command.

    Nested parses (a subcommand, a class's init_args) return as usual; only the outermost raises `Parsed`.
    Abbreviated options are refused (`--num-sample` for `--num-samples`: jsonargparse 4 expands them, its
    v5 will not), so a renamed option cannot hide behind its old name's prefix.
    """
    original_parse, original_setup = ArgumentParser.parse_args, LightningCLI.setup_parser
    depth = 0

    def parse_args(self: ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        nonlocal depth
        self.allow_abbrev = False
        depth += 1
        try:
            namespace = original_parse(self, *args, **kwargs)
        finally:
            depth -= 1
        if depth == 0:
            raise Parsed(namespace)
        return namespace

    def setup_parser(self: LightningCLI, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        key = (type(self), self.model_class, self.datamodule_class, self.subclass_mode_model, self.subclass_mode_data,
               add_subcommands, repr(main_kwargs), repr(subparser_kwargs))
        if key not in _LIGHTNING_PARSERS:
            original_setup(self, add_subcommands, main_kwargs, subparser_kwargs)
            _LIGHTNING_PARSERS[key] = self.parser
        self.parser = _LIGHTNING_PARSERS[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ArgumentParser, "parse_args", parse_args)
        patch.setattr(LightningCLI, "setup_parser", setup_parser)
        yield


def parse_command(argv: list[str], capsys: pytest.CaptureFixture) -> str | None:
    """None when `msrl <argv>` parses (or prints its help or config), else what the verb said on stderr."""
    capsys.readouterr()
    with parse_only():
        try:
            main(list(argv))
        except Parsed:
            return None
        except SystemExit as exit_info:  # a parse error exits 2; --help and --print_config exit 0
            if exit_info.code in (0, None):
                return None
            return capsys.readouterr().err.strip()[-2000:] or f"exit status {exit_info.code}"
    if argv and argv[0] in ("--version", "-V"):
        return None
    return "the command returned without its arguments being parsed"


def documented_commands() -> list[Any]:
    """Every documented command line, as pytest parameters named `<file>:<line>`."""
    params = []
    for document in DOCUMENTS:
        for number, command in command_lines(document.read_text(encoding="utf-8")):
            params.append(pytest.param(command, id=f"{document.relative_to(REPO)}:{number}"))
    return params


COMMANDS = documented_commands()


def test_the_readme_and_guides_show_commands() -> None:
    assert len(COMMANDS) > 0, "no `msrl …` line found in a fenced code block of README.md or docs/"


@pytest.mark.parametrize("command", COMMANDS)
def test_documented_command_parses(command: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
                                   ) -> None:
    monkeypatch.chdir(REPO)  # `-c configs/…` and `--data configs/…` as a reader at the repository root
    problem = parse_command(command_argv(command), capsys)
    assert problem is None, f"{command}\n{problem}"


def test_command_lines_join_continuations_and_drop_comments() -> None:
    text = "\n".join([
        "msrl sample --checkpoint outside.ckpt",  # not in a code block
        "```bash",
        "msrl pretrain -c configs/pretrain/base.yaml \\",
        "    -c configs/pretrain/brats2019.yaml  # the data set's file",
        "make test",
        "export X=1  # msrl sample in a comment is no command",
        "```",
        "  ```",
        "  msrl sample --checkpoint CKPT --out 'my samples' | tee log.txt",
        "  ```",
    ])
    assert command_lines(text) == [
        (3, "msrl pretrain -c configs/pretrain/base.yaml -c configs/pretrain/brats2019.yaml  # the data set's file"),
        (9, "msrl sample --checkpoint CKPT --out 'my samples' | tee log.txt"),
    ]
    assert command_argv(command_lines(text)[0][1]) == ["pretrain", "-c", "configs/pretrain/base.yaml", "-c",
                                                       "configs/pretrain/brats2019.yaml"]
    assert command_argv(command_lines(text)[1][1]) == ["sample", "--checkpoint", "CKPT", "--out", "my samples"]


@pytest.mark.parametrize("command", [
    "msrl pretrian -c configs/pretrain/template.yaml",  # a verb that does not exist
    "msrl pretrain -c configs/pretrain/template.yaml --model.chanels [8,8,8]",  # LightningCLI: a renamed option
    "msrl pretrain -c configs/pretrain/missing.yaml",  # a config file that does not exist
    "msrl sample --checkpoint CKPT --number-of-samples 3",  # jsonargparse: a renamed option
    "msrl sample --checkpoint CKPT --num-sample 3",  # the prefix of an option: jsonargparse 4 would expand it
    "msrl data check --data configs/data/template.yaml --read_file false",  # … likewise
    "msrl pretrain -c configs/pretrain/template.yaml --trainer.max_epoch 3",  # … and LightningCLI's parser
    "msrl data --data configs/data/template.yaml",  # `data` without check|masks
    "msrl study --pretrained CKPT",  # required options missing
])
def test_a_wrong_command_is_refused(command: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
                                    ) -> None:
    monkeypatch.chdir(REPO)
    assert parse_command(command_argv(command), capsys) is not None, command


def test_the_same_commands_spelled_right_parse(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    """The refusals above are the options' names, not the way they are run: spelled right, each parses."""
    monkeypatch.chdir(REPO)
    for command in ["msrl pretrain -c configs/pretrain/template.yaml --model.channels [8,8,8]",
                    "msrl finetune -c configs/finetune/template_latent.yaml --model.init_checkpoint CKPT",
                    "msrl sample --checkpoint CKPT --num-samples 3",
                    "msrl data check --data configs/data/template.yaml --read-files false",
                    "msrl evaluate -c configs/evaluate/template.yaml --checkpoint CKPT --out DIR",
                    "msrl --version"]:
        assert parse_command(command_argv(command), capsys) is None, command


class _AnyTagLoader(yaml.SafeLoader):
    """mkdocs.yml may hold `!!python/name:` and `!ENV` tags: read them as plain values."""


_AnyTagLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def nav_files(entries: Any) -> Iterator[str]:
    """The file of every page in mkdocs.yml's nav (nested sections included)."""
    if isinstance(entries, str):
        yield entries
    elif isinstance(entries, list):
        for entry in entries:
            yield from nav_files(entry)
    elif isinstance(entries, dict):
        for value in entries.values():
            yield from nav_files(value)


def test_every_page_in_the_nav_exists() -> None:
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=_AnyTagLoader)
    pages = [page for page in nav_files(config["nav"]) if not page.startswith(("http://", "https://"))]
    assert "index.md" in pages and "changelog.md" in pages
    missing = [page for page in pages if not (REPO / "docs" / page).is_file()]
    assert not missing, f"mkdocs.yml's nav names pages that docs/ does not have: {missing}"


def _is_module(name: str) -> bool:
    """Whether `name` imports as a module (a `:::` target may also be a class or function inside one)."""
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        return False
    return True


def test_every_api_reference_symbol_exists() -> None:
    """`::: package.Name` in docs/reference resolves (mkdocs build --strict fails otherwise; this is quicker)."""
    missing = []
    for page in sorted((REPO / "docs" / "reference").glob("*.md")):
        for name in re.findall(r"^:::\s+([\w.]+)", page.read_text(), flags=re.MULTILINE):
            if _is_module(name):
                continue
            module, _, attribute = name.rpartition(".")
            if not module or not hasattr(importlib.import_module(module), attribute):
                missing.append(f"{page.name}: {name}")
    assert not missing, missing


def test_the_version_is_the_changelogs_newest() -> None:
    changelog = (REPO / "CHANGELOG.md").read_text()
    newest = re.search(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, flags=re.MULTILINE)
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), flags=re.MULTILINE)
    assert newest and version, "CHANGELOG.md needs '## [X.Y.Z] - YYYY-MM-DD' entries, pyproject.toml a version"
    assert version.group(1) == newest.group(1), "pyproject.toml's version is not the newest CHANGELOG.md entry"
    assert (REPO / "docs" / "changelog.md").read_text().count('--8<-- "CHANGELOG.md"') == 1  # the site shows it
