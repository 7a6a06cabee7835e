"""One way to set any parameter: defaults < params.yaml < --set KEY=VALUE < explicit options, on
every stage command, checked against the params dataclasses, documented by their field comments."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner

import cli
from cli import SECTIONS, app, params_class
from stages.common import StageError
from stages.params import build_params, field_docs

runner = CliRunner()
#: the commands without a params.yaml section
PLAIN = {"inspect", "convert-checkpoint", "show"}
PARAMS = {"pretrain": {"epochs": 7, "model": {"depth": 6, "num_group": 32}},
          "finetune": {"epochs": 5},
          "partseg": {"seg": {"propagation_dims": [192, 128], "head_dims": [128, 64], "label_dim": 16}},
          "study": {"pretrain": {"monitor_every": 8}}}
STAGE_MODULES = {"demo-data": "demo_data", "index": "index", "render": "render", "sample": "sample", "embed": "embed",
                 "pretrain": "pretrain", "study": "study", "convert": "convert", "finetune": "finetune",
                 "evaluate": "evaluate", "export": "export", "attention": "attention"}


@pytest.fixture
def captured(tmp_path, monkeypatch) -> dict:
    """Every stage's ``run`` records its params instead of running; RECON_PARAMS is a tmp file."""
    import importlib

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    monkeypatch.setenv("RECON_PARAMS", str(tmp_path / "params.yaml"))
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "cache"))
    seen: dict = {}
    for command, module in STAGE_MODULES.items():
        stage = importlib.import_module(f"stages.{module}")
        monkeypatch.setattr(stage, "run", lambda p, *_, **__: seen.setdefault("p", p))
    return seen


def invoke(captured: dict, *args: str):
    captured.clear()
    result = runner.invoke(app, list(args))
    return result, captured.get("p")


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_set_reaches_nested_keys_and_keys_without_an_option(captured):
    result, p = invoke(captured, "pretrain", "--set", "query_lr_scale=2e-5", "--set", "model.depth=12")
    assert result.exit_code == 0, result.output
    assert p.query_lr_scale == 2e-5 and isinstance(p.query_lr_scale, float)
    assert p.model == {"depth": 12, "num_group": 32}             # one entry changed, params.yaml's others kept
    result, p = invoke(captured, "pretrain", "--set", "pretrain.query_lr_scale=3", "--set", "micro_batch=null",
                       "--set", "loader_workers=2", "--set", "targets=[rec, img]")
    assert result.exit_code == 0, result.output
    assert p.query_lr_scale == 3.0 and isinstance(p.query_lr_scale, float)
    assert p.micro_batch is None and p.loader_workers == 2 and p.targets == ["rec", "img"]
    result, p = invoke(captured, "finetune", "--task", "partseg", "--set", "partseg.seg.head_dims=[64, 32]",
                       "--set", "seg.dropout=0.25")
    assert result.exit_code == 0, result.output
    assert type(p).__name__ == "PartSegParams"
    assert p.seg == {"propagation_dims": [192, 128], "head_dims": [64, 32], "label_dim": 16, "dropout": 0.25}
    result, p = invoke(captured, "study", "--set", "study.pretrain.epochs=2", "--set", "pretrain.model.depth=2",
                       "--set", "fewshot.ways=[5, 10]", "--set", "finetune.lr=1e-4")
    assert result.exit_code == 0, result.output
    assert p.pretrain == {"monitor_every": 8, "epochs": 2, "model": {"depth": 2}}
    assert p.fewshot["ways"] == [5, 10] and p.finetune["lr"] == 1e-4 and p.finetune["profile"] == "demo"
    result, p = invoke(captured, "finetune", "--seeds", "0,1", "--set", "head_lr_scale=5")
    assert result.exit_code == 0, result.output
    assert p.seeds == [0, 1] and p.head_lr_scale == 5.0


@pytest.mark.parametrize("args, expected", [
    ((), 7),                                              # params.yaml over the default (300)
    (("--set", "epochs=8"), 8),                           # --set over params.yaml
    (("--set", "epochs=8", "--epochs", "9"), 9),          # the explicit option over --set
    (("--epochs", "9", "--set", "epochs=8"), 9),          # whatever the order on the line
])
def test_precedence_default_params_yaml_set_option(captured, args, expected):
    result, p = invoke(captured, "pretrain", *args)
    assert result.exit_code == 0, result.output
    assert p.epochs == expected
    assert p.lr == 5e-4                                   # not in params.yaml: the dataclass default


def test_precedence_of_a_positional_argument(captured):
    result, p = invoke(captured, "demo-data", "given", "--set", "out=set", "--set", "seed=3")
    assert result.exit_code == 0, result.output
    assert (p.out, p.seed) == ("given", 3)


@pytest.mark.parametrize("args, message", [
    (("pretrain", "--set", "nosuch=1"), "unknown key pretrain.nosuch"),
    (("pretrain", "--set", "model.nosuch=1"), "unknown key pretrain.model.nosuch"),
    (("finetune", "--set", "seg.label_dim=8"), "unknown key finetune.seg"),
    (("finetune", "--set", "partseg.seg.label_dim=8"), "unknown key finetune.partseg"),
    (("study", "--set", "pretrain.nosuch=1"), "unknown key study.pretrain.nosuch"),
])
def test_unknown_keys_are_errors_naming_the_valid_keys(captured, args, message):
    result, p = invoke(captured, *args)
    assert result.exit_code == 1 and p is None
    out = one_line(result.output)
    assert out.startswith("error: ") and message in out and "valid keys:" in out
    assert "Traceback" not in result.output
    section = args[0]
    valid = {"pretrain": "query_lr_scale", "finetune": "head_lr_scale", "study": "query_lr_scale"}[section]
    if "model." in args[-1]:
        valid = "num_group"                               # a nested key names ReConConfig's fields
    assert valid in out


def test_seg_is_a_partseg_key_not_a_classification_one(captured, tmp_path):
    result, p = invoke(captured, "finetune", "--task", "partseg", "--set", "seg.label_dim=8")
    assert result.exit_code == 0, result.output
    assert p.seg["label_dim"] == 8
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"finetune": {"seg": {"label_dim": 8}}}))
    result, p = invoke(captured, "finetune")             # no longer accepted and silently ignored
    assert result.exit_code == 1 and "unknown key finetune.seg" in one_line(result.output)


@pytest.mark.parametrize("setting", ["epochs=ten", "epochs=2.5", "model.depth=1.5", "stop_grad=maybe",
                                     "targets=rec", "model=3", "epochs.x=1", "lr=[1]", "noequals"])
def test_wrong_types_are_errors(captured, setting):
    result, p = invoke(captured, "pretrain", "--set", setting)
    assert result.exit_code == 1 and p is None, result.output
    assert one_line(result.output).startswith("error: ") and "Traceback" not in result.output


def test_params_yaml_values_are_checked_too(tmp_path, monkeypatch):
    from recon.pretraining.trainer import PretrainParams

    (tmp_path / "params.yaml").write_text("pretrain: {epochs: many}\n")
    monkeypatch.setenv("RECON_PARAMS", str(tmp_path / "params.yaml"))
    with pytest.raises(StageError, match="pretrain.epochs must be int, got 'many'"):
        build_params(PretrainParams, "pretrain")
    (tmp_path / "params.yaml").write_text("pretrain: {lr: 2e-5, query_lr_scale: 25}\n")   # YAML 1.1: "2e-5" is a string
    p = build_params(PretrainParams, "pretrain")
    assert p.lr == 2e-5 and p.query_lr_scale == 25.0 and isinstance(p.query_lr_scale, float)


def click_commands() -> dict[str, click.Command]:
    return typer.main.get_command(app).commands


def test_every_stage_command_accepts_set(captured):
    commands = click_commands()
    assert set(commands) - set(SECTIONS) == PLAIN
    assert set(SECTIONS) <= set(commands)
    for name in SECTIONS:
        assert isinstance(commands[name], cli.ParamsCommand), name
        assert [p for p in commands[name].params if p.name == "sets" and "--set" in p.opts], name
        section, cls = next(iter(SECTIONS[name].items()))
        # a --set of a key with a changed value reaches the stage
        hints = typing.get_type_hints(params_class(cls))
        f = next(f for f in reversed(dataclasses.fields(params_class(cls))) if hints[f.name] in (int, bool))
        value = (not f.default) if hints[f.name] is bool else f.default + 1
        result, p = invoke(captured, name, "--set", f"{section}.{f.name}={yaml.safe_dump(value).split()[0]}")
        assert result.exit_code == 0, (name, result.output)
        assert getattr(p, f.name) == value, name
        result, p = invoke(captured, name, "--set", "nosuch=1")
        assert result.exit_code == 1 and f"unknown key {section}.nosuch" in one_line(result.output), name


def test_finetune_sections_are_the_stage_tasks():
    from stages.finetune import TASKS

    assert {section: params_class(spec) for section, spec in SECTIONS["finetune"].items()} == dict(TASKS.values())


def params_classes() -> list[type]:
    from recon.downstream.study import StudyParams

    return [params_class(spec) for sections in SECTIONS.values() for spec in sections.values()] + [StudyParams]


@pytest.mark.parametrize("cls", params_classes(), ids=lambda c: c.__name__)
def test_every_field_has_a_help_text(cls):
    docs = field_docs(cls)
    assert set(docs) == {f.name for f in dataclasses.fields(cls)}
    assert not [name for name, text in docs.items() if not text.strip()]


def test_field_docs_reads_comments():
    @dataclass
    class Base:
        a: int = 1            # the a
        #: the b,
        #: over two lines
        b: list[int] = field(default_factory=lambda: [1,
                                                      2])
        c: str = "x"          # the c,
                              # continued
        d: float = 0.0

    @dataclass
    class Child(Base):
        a: int = 2
        d: float = 1.0        # the child's d

    assert field_docs(Base) == {"a": "the a", "b": "the b, over two lines", "c": "the c, continued", "d": ""}
    assert field_docs(Child) == {"a": "the a", "b": "the b, over two lines", "c": "the c, continued",
                                 "d": "the child's d"}


def test_help_lists_every_key_with_type_default_and_comment(captured):
    from recon.pretraining.trainer import PretrainParams

    result = runner.invoke(app, ["pretrain", "--help"])
    assert result.exit_code == 0, result.output
    out = one_line(result.output)
    docs = field_docs(PretrainParams)
    assert f"query_lr_scale: float = 1.0 — {docs['query_lr_scale']}" in out
    assert "epochs: int = 300 (params.yaml: 7)" in out
    for f in dataclasses.fields(PretrainParams):
        assert f"{f.name}: " in out
    assert "[params:" not in out
    finetune = one_line(runner.invoke(app, ["finetune", "--help"]).output)
    assert "Section partseg" in finetune and "seg: dict = {}" in finetune and "PartSegConfig" in finetune


def test_explicit_options_take_their_help_from_the_field_comments():
    from recon.pretraining.trainer import PretrainParams

    command = click_commands()["pretrain"]
    with click.Context(command, info_name="pretrain") as ctx:
        command.get_help(ctx)
    helps = {p.name: p.help for p in command.params}
    docs = field_docs(PretrainParams)
    assert helps["epochs"] == docs["epochs"] and helps["cuda_graph"] == docs["cuda_graph"]
    assert helps["loader_workers"].startswith(docs["loader_workers"]) and "auto | N" in helps["loader_workers"]
    assert cli.SETS.help and "KEY=VALUE" in command.params[-1].metavar


def test_study_preset_from_its_option_or_set(captured):
    result, p = invoke(captured, "study", "--preset", "table4")
    assert result.exit_code == 0, result.output
    assert p.preset == "table4"
    result, p = invoke(captured, "study", "--set", "preset=table14")
    assert result.exit_code == 0, result.output
    assert p.preset == "table14"
    result, p = invoke(captured, "study")
    assert result.exit_code == 0 and p.preset is None
