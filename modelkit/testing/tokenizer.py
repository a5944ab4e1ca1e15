"""A tiny byte-level BPE tokenizer, trained locally and deterministically.

Special tokens take the ids Gemma uses (pad 0, eos 1, bos 2, unk 3) so every tiny config
can share one set of token ids.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 384
SPECIAL_TOKENS = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}
SPECIAL_IDS = {"pad": 0, "eos": 1, "bos": 2, "unk": 3}
MAX_LENGTH = 128

_WORDS = (
    "the a model loads tensor from disk and router picks one expert per token def return "
    "import torch class self weight bias layer norm attention query key value output hidden "
    "state if else for in range print list dict none true false shape rank core adapter "
    "merge scale lora base config save load export diff inspect shard index file path "
    "sum mean max min len zip map 0 1 2 3 4 5 6 7 8 9 ( ) [ ] : , . = + - * / \n"
).split(" ")


def corpus(lines: int = 600) -> list[str]:
    """A synthetic, fixed text corpus mixing prose-like and code-like lines."""
    n = len(_WORDS)
    out = []
    for i in range(lines):
        words = [_WORDS[(i * 7 + j * (i % 5 + 1) * 3) % n] for j in range(6 + i % 11)]
        out.append(" ".join(words))
        out.append(f"def f_{i % 17}(x):\n    return x * {i % 9} + {i % 4}")
    return out


@functools.lru_cache(maxsize=1)
def _trained_json() -> str:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("pad", "eos", "bos", "unk")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, SPECIAL_IDS["bos"])]
    )
    for key, token in SPECIAL_TOKENS.items():
        assert tok.token_to_id(token) == SPECIAL_IDS[key], (token, tok.token_to_id(token))
    return tok.to_str()


def tiny_tokenizer() -> "PreTrainedTokenizerFast":
    """A fresh ``PreTrainedTokenizerFast`` around the trained tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_json()),
        model_max_length=MAX_LENGTH,
        **{f"{k}_token": v for k, v in SPECIAL_TOKENS.items()},
    )


def vocab_size() -> int:
    """Number of tokens, which is also the tiny models' ``vocab_size``."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_json()).get_vocab_size()


def write_tokenizer(out: Path) -> Path:
    """Save the tiny tokenizer into ``out`` with ``save_pretrained``; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer().save_pretrained(out)
    return out
