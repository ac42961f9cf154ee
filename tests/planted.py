"""A tiny Llama with a planted attention sink, shared by the detector, profile and analysis tests.

Every query carries a constant component in one head dimension (embedding feature 1) and only
token ``SINK`` has a key there (feature 0), so every later query attends to it; all other attention
is close to uniform.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SINK = 7  # the planted sink's token id
NORMAL = 50  # an ordinary token id
HEAD_DIM = 16


def planted_model(attn: str = "sdpa", layers: int = 1, strength: float = 6.0) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=HEAD_DIM, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = attn
    j = HEAD_DIM // 2 - 1  # last rotary pair: rotates ~1e-3 rad per position
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_(0, 0.3)
        emb[:, 0] = 0.0  # feature 0: "I am the sink"
        emb[:, 1] = 1.0  # feature 1: constant, feeds every query
        emb[SINK, 0] = 3.0
        for layer in model.model.layers:
            att = layer.self_attn
            att.q_proj.weight.mul_(0.1)
            att.k_proj.weight.mul_(0.1)
            att.q_proj.weight[:, :2] = 0.0
            att.k_proj.weight[:, :2] = 0.0
            for h in range(cfg.num_attention_heads):
                att.q_proj.weight[h * HEAD_DIM + j, 1] = strength
            for g in range(cfg.num_key_value_heads):
                att.k_proj.weight[g * HEAD_DIM + j, 0] = strength
    return model


class FakeTokenizer:
    bos_token_id = None

    def decode(self, ids):
        return "".join("." if int(i) == SINK else f" w{int(i)}" for i in ids)

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        class Enc:
            input_ids = [[1, 2]] if return_tensors is None else torch.tensor([[1, 2]])

        return Enc()


def sample(length: int, sinks_at: tuple[int, ...], seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 128, (length,), generator=g)
    ids[ids == SINK] = NORMAL
    for p in sinks_at:
        ids[p] = SINK
    return ids.tolist()


def planted_profile_dict() -> dict:
    """A profile measured on the planted model (2 layers; the sink at columns 5 and 40)."""
    from sinkcache.profile import build_profile

    model = planted_model(layers=2)
    texts = [sample(96, (5, 40), seed=s) for s in range(3)]
    return build_profile(model, FakeTokenizer(), texts, threshold=0.1, min_count=3, min_rate=0.5, model_name="tiny")
