"""Tiny randomly initialised models of every supported architecture (no download, fast)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _build(name: str, attn: str = "eager", dtype=torch.float32, **over):
    torch.manual_seed(0)
    kw = dict(COMMON, **over)
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw, head_dim=32))
    elif name == "llama_mha":
        model = LlamaForCausalLM(LlamaConfig(**dict(kw, num_key_value_heads=4), head_dim=16))
    elif name == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    elif name == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**kw, head_dim=32))
    elif name == "mistral":
        model = MistralForCausalLM(MistralConfig(**kw, head_dim=32, sliding_window=None))
    elif name == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**dict(kw, num_hidden_layers=2)))
    elif name == "gemma3":
        model = Gemma3ForCausalLM(
            Gemma3TextConfig(
                **dict(kw, num_hidden_layers=4),
                head_dim=32,
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            )
        )
    else:
        raise KeyError(name)
    model.config._attn_implementation = attn
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


ARCHS = ["llama", "llama_mha", "qwen2", "qwen3", "mistral", "phi3", "gemma3"]


@pytest.fixture(scope="session")
def tiny():
    cache: dict = {}

    def get(name: str = "llama", attn: str = "eager", dtype=torch.float32):
        key = (name, attn, dtype)
        if key not in cache:
            cache[key] = _build(name, attn, dtype)
        return cache[key]

    return get


def prompt(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: they gain nothing from more, and on a
    busy machine OpenMP spin-waits make two threads many times slower than one.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def byte_tok():
    """The byte-level tokenizer of the lm-eval tests (no download)."""
    from test_evals import _byte_tokenizer

    return _byte_tokenizer()


@pytest.fixture(scope="module")
def byte_ckpt(tmp_path_factory, byte_tok):
    """:func:`byte_model` and :func:`byte_tok` saved as a local checkpoint dir (for code that loads by path)."""
    d = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    _build("llama", vocab_size=len(byte_tok)).save_pretrained(d)
    byte_tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def byte_model(byte_tok):
    """The tiny random Llama sized for :func:`byte_tok`."""
    return _build("llama", vocab_size=len(byte_tok))
