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
        (["demo", "--prompt-tokens", "5"], "--prompt-tokens"),
        (["demo", "--bits", "1"], "--bits"),
        (["demo", "--group-size", "0"], "--group-size"),
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
        (["demo", "--budget", "8", "--window", "16"], "window=16 exceeds budget=8"),
        (["demo", "--budget", "18", "--window", "16"], "budget=18 is smaller than window=16 + sinks=4"),
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


# --------------------------------------------------------------------------- demo pieces


def test_agreement():
    assert cli.agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (1.0, 1.0)
    assert cli.agreement([1, 2, 9, 4], [1, 2, 3, 4]) == (0.5, 0.75)
    assert cli.agreement([1, 2], [1, 2, 3, 4]) == (0.5, 0.5)  # stopped early
    assert cli.agreement([], []) == (1.0, 1.0)


def test_demo_configs_are_valid_sinkcache_arguments():
    configs = cli.demo_configs(budget=256, window=192, bits=2)
    assert [kw["policy"] for _, kw in configs] == ["full", "evict", "quantize", "evict", "quantize"]
    assert configs[1][1] == {"policy": "evict", "sinks": "first", "n_first": 4, "budget": 256, "window": 192}
    assert configs[2][1]["sinks"] == "none" and configs[4][1]["sinks"] == "auto"
    assert (
        configs[3][1]["budget"] == configs[1][1]["budget"]
        and configs[3][1]["window"] == configs[1][1]["window"]
    )
    for _, kw in configs:
        SinkCache(**kw)


class _WordTokenizer:
    """One token per whitespace-separated word; no chat template."""

    chat_template = None

    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.zeros(1, len(text.split()), dtype=torch.long)}


@pytest.mark.parametrize("target", [50, 300, 1200])
def test_demo_prompt_is_deterministic_and_long_enough(target):
    tok = _WordTokenizer()
    prompt, inputs = cli.build_demo_prompt(tok, target)
    again, _ = cli.build_demo_prompt(tok, target)
    assert prompt == again
    n = inputs["input_ids"].shape[1]
    assert target <= n < target + 80  # one paragraph of slack at most
    assert prompt.answer in prompt.report and prompt.answer not in prompt.question
    assert prompt.report.count(prompt.answer) == 1


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


@pytest.mark.real_model
def test_demo_smoke(capsys):
    # Small sizes that still make every row compress: 16-token quantization groups and windows.
    argv = ["demo", "--prompt-tokens", "120", "--max-new-tokens", "5", "--budget", "48", "--window", "16"]
    argv += ["--quant-window", "16", "--group-size", "16", "--threads", "1"]
    threads = torch.get_num_threads()
    rc = cli.main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert torch.get_num_threads() == threads  # --threads is undone when the command ends
    out = captured.out
    rows = {}
    for label, _ in cli.demo_configs(48, 16, 2):
        rows[label] = next(line for line in out.splitlines() if line.startswith(label))
    assert (
        "1.00x" in rows["full cache"] and "1.00  " in rows["full cache"]
    )  # the reference agrees with itself
    for label, row in rows.items():  # every other row holds less than the full cache
        if label != "full cache":
            ratio = float(row[len(label) :].split()[2].rstrip("x"))
            assert ratio > 1.5, row
