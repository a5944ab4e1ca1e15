"""The fixed prompts two forms of one model are run on to compare their logits: an export
against its source (``ops/verify.py``), a format's two stored forms against each other
(compressed MoE's ``check``)."""
from __future__ import annotations

PROMPTS = (
    "def add(a, b):\n    return a + b",
    "the router picks one expert per token and the model loads tensor from disk",
    "import torch\nclass layer(self):\n    weight = torch.zeros(3)",
    "for i in range(9): print(sum(map(len, zip(a, b))))",
)


def prompt_ids(tokenizer, vocab_size: int) -> list:
    """Token ids of the fixed prompts (fixed ids when there is no tokenizer)."""
    import torch

    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (1, 12 + 3 * i), generator=g) for i in range(len(PROMPTS))]
    return [tokenizer(p, return_tensors="pt")["input_ids"].clamp(max=vocab_size - 1) for p in PROMPTS]
