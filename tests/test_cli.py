"""Tests for the ``sinkcache`` command line: parser, help, errors (fast) and real-model runs."""

from __future__ import annotations

import argparse

import pytest
import torch

from sinkcache import SinkCache, cli, models
from sinkcache._console import format_bytes, format_stats, format_table, shorten

COMMANDS = ("generate", "demo")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command tries to load a model (errors must come first)."""

    def boom(*args, **kwargs):
        raise AssertionError("option errors must be reported before loading a model")

    monkeypatch.setattr(models, "load_model", boom)


# --------------------------------------------------------------------------- help


def test_top_level_help(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert "sinkcache" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_command_help_explains_every_option_with_default(cmd, capsys):
    assert cli.main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    sub = _subparsers(cli.build_parser())[cmd]
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.option_strings[-1] in out
        assert action.help, f"{action.option_strings} has no help"
        shown = cli._HelpFormatter(cmd)._get_help_string(action) or ""
        assert "default" in shown, f"{action.option_strings} does not state its default"


def test_subcommand_is_required(capsys):
    assert cli.main([]) == 2
    assert "required" in capsys.readouterr().err


# --------------------------------------------------------------------------- option errors


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate"], "the following arguments are required"),
        (["generate", "m", "p", "--policy", "bogus"], "--policy"),
        (["generate", "m", "p", "--bits", "3"], "--bits"),
        (["generate", "m", "p", "--budget", "0"], "--budget"),
        (["generate", "m", "p", "--window", "-1"], "--window"),
        (["generate", "m", "p", "--max-new-tokens", "x"], "--max-new-tokens"),
        (["generate", "m", "p", "--top-p", "1.5"], "--top-p"),
        (["generate", "m", "p", "--temperature", "0"], "--temperature"),
        (["generate", "m", "p", "--dtype", "int8"], "int8"),
        (["generate", "m", "p", "--sinks", "middle"], "--sinks"),
        (["demo", "--context", "5"], "--context"),
        (["demo", "--questions", "0"], "--questions"),
        (["demo", "--score", "best"], "--score"),
        (["nosuchcommand"], "invalid choice"),
        (["compare", "m", "--budgets", "abc"], "argument --budgets: 'abc' is not a number"),
        (["compare", "m", "--bits", "4,x"], "argument --bits: 'x' is not an integer"),
        (["compare", "m", "--ruler-lengths", ","], "argument --ruler-lengths: no integers"),
        (["eval", "m", "--ruler-lengths", "1k"], "argument --ruler-lengths: '1k' is not an integer"),
    ],
)
def test_usage_errors_are_one_line(argv, needle, capsys, no_model_load):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # no usage block: --help is for that
    assert err.split(": error: ")[0] in ("sinkcache", f"sinkcache {argv[0]}") and needle in err
    assert "--help" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "m", "p", "--policy", "evict", "--bits", "2"], "does not use bits"),
        (["generate", "m", "p", "--policy", "evict"], "needs budget"),
        (
            ["generate", "m", "p", "--policy", "evict", "--budget", "8", "--window", "16"],
            "window=16 exceeds budget=8",
        ),
        (["generate", "m", "p", "--policy", "full", "--window", "16"], "does not use window"),
        (["generate", "m", "p", "--temperature", "0.5"], "need --sample"),
        (["demo", "--budget-percent", "101"], "--budget-percent 101 must be in (0, 100]"),
        (["generate", "m", ""], "PROMPT is empty"),
        (["generate", "m", " \n "], "PROMPT is empty"),
    ],
)
def test_bad_combinations_fail_before_loading_a_model(argv, needle, capsys, no_model_load):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sinkcache: error: ") and needle in err
    assert len(err.splitlines()) == 1


def test_unknown_task_fails_before_loading_a_model_and_names_close_matches(capsys, no_model_load):
    assert cli.main(["eval", "m", "--tasks", "no_such_task,sinkcache_pasky"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown tasks 'no_such_task'" in err and "'sinkcache_pasky' (close: sinkcache_passkey" in err


def test_options_the_model_rules_out_are_one_line_errors(monkeypatch, capsys, tiny):
    """--window beyond the model's context, a group size that does not divide its heads."""
    model = tiny("llama")
    tok = lambda text, return_tensors=None: {"input_ids": torch.tensor([[5, 6, 7]])}  # noqa: E731
    monkeypatch.setattr(models, "load_model", lambda name, **kw: (model, tok))
    assert cli.main(["generate", "m", "hi", "--policy", "quantize", "--window", "1000000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "window=1000000000 exceeds the model's context (max_position_embeddings=4096)" in err
    assert cli.main(["generate", "m", "hi", "--policy", "quantize", "--group-size", "7"]) == 2
    assert "group_size=7 does not divide head_dim" in capsys.readouterr().err


def test_runtime_errors_are_one_line(monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise RuntimeError("pip failed\nrun this by hand:\n  pip install x")

    monkeypatch.setattr(models, "load_model", fail)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(["generate", "smollm2-135m", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sinkcache: error: pip failed run this by hand: pip install x"


def test_debug_env_shows_the_traceback(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(models, "load_model", fail)
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["generate", "smollm2-135m", "hi"])


def test_missing_model_file_is_a_clean_error(capsys, tmp_path):
    assert cli.main(["generate", str(tmp_path / "missing.gguf"), "hi"]) == 2
    assert "GGUF file not found" in capsys.readouterr().err


def test_cache_kwargs_leave_unset_knobs_out():
    args = cli.build_parser().parse_args(["generate", "m", "p", "--policy", "evict", "--budget", "64"])
    assert cli._cache_kwargs(args) == {"policy": "evict", "sinks": "first", "budget": 64}
    args = cli.build_parser().parse_args(["generate", "m", "p", "--sinks", "none", "--n-first", "0"])
    assert cli._cache_kwargs(args)["n_first"] == 0  # an explicit 0 is kept, not read as unset
    SinkCache(**cli._cache_kwargs(args))  # the core accepts exactly these


def test_chat_needs_a_template():
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        cli._encode(NoTemplate(), "hi", chat=True, model_name="gemma3-270m")


def test_console_helpers():
    assert format_bytes(512) == "512 B"
    assert format_bytes(13_145_040) == "12.5 MiB"
    assert shorten("a\nb  c", 10) == "a b c"
    assert shorten("x" * 20, 10) == "xxxxxxx..."
    table = format_table(["name", "n"], [["a", 1], ["bbb", 22]], align="lr")
    assert table.splitlines() == ["name   n", "----  --", "a      1", "bbb   22"]
    text = format_stats(
        {"memory_bytes": 2048, "compression_ratio": 4.456, "sinks_per_layer": [1, 2, 3], "policy": "q"}
    )
    assert "2.0 KiB (2,048 bytes)" in text and "4.46x" in text and "mean 2.00" in text and "policy: q" in text


# --------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_generate_chat_names_paris(capsys):
    rc = cli.main(
        ["generate", "smollm2-135m", "What is the capital of France?", "--chat", "--max-new-tokens", "12"]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Paris" in captured.out
    assert "compression_ratio" in captured.err and "tokens_seen" in captured.err


@pytest.mark.real_model
def test_generate_stream_evict(capsys):
    argv = ["generate", "smollm2-135m", "What is the capital of France?", "--chat", "--stream"]
    argv += ["--policy", "evict", "--budget", "32", "--window", "8", "--sinks", "first", "--n-first", "4"]
    argv += ["--max-new-tokens", "8"]
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.strip()  # streamed text
    assert "policy: evict" in captured.err
