"""The command line: flags generated from config dataclasses, and the namm-transfer command table."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from namm_transfer.pipelines import cli
from namm_transfer.pipelines.cli import COMMANDS, main, parse
from namm_transfer.pipelines.cli_config import (
    Command,
    HelpFormatter,
    add_config_arguments,
    config_from_args,
    field_docs,
)
from namm_transfer.pipelines.rl.evaluate import EvalRolloutConfig
from namm_transfer.pipelines.text.evaluate import EvalTextConfig
from namm_transfer.pipelines.text.evolve import EvolveConfig


@dataclass
class Toy:
    """A toy config.

    Attributes:
        count: how many (at least 1).
        rate: a rate; 100% is 1.
        name: a name.
        flag: a switch.
        limit: an optional cap on :data:`COUNT`, ``none`` for no cap. This description
            continues on a second line.
        words: a list of words.
        sizes, weights: lists of numbers.
        extra: a tuple of names.
        mode: how fast.
        label: an optional label.
    """

    count: int = 1
    rate: float = 0.5
    name: str = "x"
    flag: bool = False
    limit: int | None = 8
    words: list[str] = field(default_factory=lambda: ["a", "b"])
    sizes: list[int] = field(default_factory=lambda: [1])
    weights: list[float] = field(default_factory=list)
    extra: tuple[str, ...] = ()
    mode: Literal["fast", "slow"] = "fast"
    label: str | None = None

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")


@dataclass
class Export:
    """Settings of a toy export.

    Attributes:
        source: the directory exported.
        name: short name.
        size: size in the old flag's name.
    """

    source: str
    name: str
    size: int = 3


@dataclass
class Named:
    """Settings that name an optional extra.

    Attributes:
        source: the extra, or none.
    """

    source: str | None = "shipped"


def _parser(cls: type = Toy, **overrides) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy", formatter_class=HelpFormatter)
    add_config_arguments(parser, cls, overrides)
    return parser


def _config(argv: list[str], cls: type = Toy, **overrides):
    parser = _parser(cls, **overrides)
    return config_from_args(parser, cls, parser.parse_args(argv))


def _exit_code(call, *args, **kwargs) -> int:
    with pytest.raises(SystemExit) as exit_info:
        call(*args, **kwargs)
    return exit_info.value.code


# --- the generator ------------------------------------------------------------------------------------


def test_help_is_parsed_from_the_attributes_section():
    docs = field_docs(Toy)
    assert docs["count"] == "how many (at least 1)"  # the final full stop goes: argparse adds the default
    assert docs["rate"] == "a rate; 100%% is 1"  # escaped for argparse's %-formatting
    assert docs["limit"] == ("an optional cap on COUNT, none for no cap. This description continues on a "
                             "second line")
    assert docs["sizes"] == docs["weights"] == "lists of numbers"  # a grouped entry documents each name
    assert set(docs) == {f for f in Toy.__dataclass_fields__}


def test_help_shows_the_docs_and_defaults(capsys):
    assert _exit_code(_parser().parse_args, ["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--flag, --no-flag a switch (default: False)" in out
    assert "--rate RATE a rate; 100% is 1 (default: 0.5)" in out
    assert "--mode {fast,slow} how fast (default: fast)" in out


def test_defaults_come_from_the_dataclass():
    assert _config([]) == Toy()
    first, second = _config([]), _config([])
    first.words.append("c")  # each parse gets its own default_factory list
    assert second.words == ["a", "b"]


def test_types_follow_the_annotations():
    cfg = _config(["--count", "3", "--rate", "0.25", "--name", "y", "--words", "c", "d", "--sizes", "2", "4",
                   "--weights", "0.5", "1", "--extra", "p", "q", "--mode", "slow", "--label", "L"])
    assert cfg == Toy(count=3, rate=0.25, name="y", words=["c", "d"], sizes=[2, 4], weights=[0.5, 1.0],
                      extra=("p", "q"), mode="slow", label="L")
    assert isinstance(cfg.extra, tuple) and isinstance(cfg.weights[1], float)


def test_bools_have_both_switches():
    assert _config(["--flag"]).flag is True
    assert _config(["--flag", "--no-flag"]).flag is False


def test_optional_numbers_accept_none_and_strings_stay_strings():
    assert _config(["--limit", "none"]).limit is None
    assert _config(["--limit", "4"]).limit == 4
    assert _config(["--label", "none"]).label == "none"  # its default is None: nothing to switch off


def test_an_optional_string_with_a_default_can_be_switched_off():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Named)
    assert config_from_args(parser, Named, parser.parse_args(["--source", "none"])).source is None
    assert config_from_args(parser, Named, parser.parse_args([])).source == "shipped"


def test_wrong_types_and_choices_are_usage_errors(capsys):
    assert _exit_code(_config, ["--count", "two"]) == 2
    assert "invalid int value: 'two'" in capsys.readouterr().err
    assert _exit_code(_config, ["--mode", "medium"]) == 2
    assert "invalid choice: 'medium'" in capsys.readouterr().err
    assert _config(["--words", "c"], words={"choices": ("b", "c")}).words == ["c"]
    assert _exit_code(_config, ["--words", "z"], words={"choices": ("b", "c")}) == 2


def test_a_value_error_of_the_config_is_a_usage_error(capsys):
    assert _exit_code(_config, ["--count", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: toy") and "error: count must be >= 1, got 0" in err


def test_an_undocumented_field_is_refused():
    @dataclass
    class Half:
        """Half documented.

        Attributes:
            a: documented.
        """

        a: int = 0
        b: int = 0

    with pytest.raises(ValueError, match=r"Half\.b is not documented"):
        _parser(Half)

    @dataclass
    class Bare:
        a: int = 0

    with pytest.raises(ValueError, match=r"Bare\.a is not documented"):
        _parser(Bare)


def test_an_unsupported_type_needs_an_explicit_one():
    @dataclass
    class Nested:
        """Nested lists.

        Attributes:
            stages: tasks per stage.
        """

        stages: list[list[str]] = field(default_factory=lambda: [["a"]])

    with pytest.raises(TypeError, match="no command-line form"):
        _parser(Nested)
    split = {"type": lambda t: [s.split(",") for s in t.split(";")]}
    assert _config(["--stages", "a;b,c"], Nested, stages=split).stages == [["a"], ["b", "c"]]
    with pytest.raises(ValueError, match=r"no field\(s\) \['nope'\]"):
        _parser(Toy, nope={})


def test_positional_required_and_other_flags(capsys):
    overrides = {"source": {"positional": True}, "size": {"flags": ("--old-size", "-s")}}
    cfg = _config(["dir", "--name", "n", "-s", "5"], Export, **overrides)
    assert cfg == Export("dir", "n", 5)
    assert _exit_code(_config, ["dir"], Export, **overrides) == 2  # a field without a default is required
    assert "the following arguments are required: --name" in capsys.readouterr().err
    assert _exit_code(_config, ["dir", "--name", "n", "--size", "5"], Export, **overrides) == 2


# --- the namm-transfer table ----------------------------------------------------------------------------

# Values for the fields without a usable default, per subcommand: (command line, config fields).
REQUIRED = {
    "eval-video": (["--annotations", "a.jsonl"], {"annotations": "a.jsonl"}),
    "video-stats": (["--annotations", "a.jsonl"], {"annotations": "a.jsonl"}),
    "export-namm": (["runs/r", "--name", "n"], {"run_dir": "runs/r", "name": "n"}),
    "export-video-model": (["runs/v", "--name", "n"], {"model_dir": "runs/v", "name": "n"}),
    "show-text-task": (["kv"], {"task": "kv"}),
}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_no_flags_build_the_default_config(command):
    argv, values = REQUIRED.get(command.name, ([], {}))
    parsed, cfg = parse([*command.name.split(), *argv])
    assert parsed is command and cfg == command.config(**values)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_field_has_a_documented_flag(command, capsys):
    docs = field_docs(command.config)
    assert _exit_code(main, [*command.name.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert command.description[:40] in " ".join(out.split())
    for name in command.config.__dataclass_fields__:
        extra = command.args.get(name, {})
        flags = extra.get("flags", ["--" + name.replace("_", "-")])
        flag = name.upper() if extra.get("positional") else flags[0]
        assert docs[name] and flag in out, name


def test_the_commands_users_run_parse_as_before():
    _, cfg = parse("eval-text --namm smollm2-text --n 32 --budgets 0.5 0.25 own --threads 1 --output-dir o"
                   .split())
    assert cfg == EvalTextConfig(namm="smollm2-text", n=32, budgets=["0.5", "0.25", "own"], threads=1,
                                 output_dir="o")
    _, cfg = parse(["evolve", "--engine", "shared-prefill", "--stages", "passkey; passkey,kv", "--budgets",
                    "0.25,0.5", "--resume", "--threads", "1"])
    assert cfg == EvolveConfig(engine="shared-prefill", stages=[["passkey"], ["passkey", "kv"]],
                               budgets=[0.25, 0.5], resume=True, threads=1)
    _, cfg = parse(["eval-rollout", "--policies", "full", "NAMM", "--no-plot", "--update-every", "12"])
    assert cfg == EvalRolloutConfig(policies=["full", "NAMM"], plot=False, update_every=12)
    assert parse(["eval-text", "--no-namm-rows"])[1].namm_rows is False
    assert parse(["eval-text", "--model", "gemma3-270m"])[1].model == "gemma3-270m"
    assert parse(["train-dt", "-K", "3"])[1].context == 3
    assert parse(["bench", "ablation", "--run", "A=runs/a", "--run", "B b=runs/b"])[1].runs == [
        "A=runs/a", "B b=runs/b"]
    assert parse(["bench", "overhead", "--lengths", "256", "512"])[1].lengths == [256, 512]
    assert parse(["demo", "--video-namm-budget", "none"])[1].video_namm_budget is None


def test_bad_settings_exit_with_the_configs_message(capsys):
    assert _exit_code(main, ["eval-text", "--budgets", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: namm-transfer eval-text") and "kept fraction in (0, 1]" in err
    assert _exit_code(main, ["evolve", "--stages", ";"]) == 2
    assert "bad --stages ';'" in capsys.readouterr().err
    assert _exit_code(main, ["eval-video"]) == 2  # --annotations is required
    assert _exit_code(main, []) == 2 and _exit_code(main, ["bench"]) == 2


def test_top_level_help_lists_every_command(capsys):
    assert _exit_code(main, ["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c.name.split()[0] in out for c in COMMANDS)
    assert _exit_code(main, ["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(c.name.split()[1] in out for c in COMMANDS if c.name.startswith("bench "))


def test_main_hands_the_config_and_command_line_to_the_job(monkeypatch):
    calls = []
    toy = Command("toy", Toy, lambda cfg, argv: calls.append((cfg, argv)), "a toy", "A toy job.")
    monkeypatch.setattr(cli, "COMMANDS", (toy,))
    assert main(["toy", "--count", "2"]) == 0
    assert calls == [(Toy(count=2), ["toy", "--count", "2"])]
