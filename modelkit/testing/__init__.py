"""Writers of tiny artifacts in every on-disk layout and fault of FORMATS.md.

Everything is written by the real writers (transformers and PEFT ``save_pretrained``,
``torch.save`` of the documented dicts, ``safetensors.torch.save_file``) from tiny models
built under fixed seeds, so tests and demos run offline in seconds.
"""
from modelkit.testing.catalog import ENTRIES, GROUPS, load_catalog, write_catalog
from modelkit.testing.compressed import (
    expected_expert_weights,
    naive_expert,
    reconstruct_expert,
    write_compressed_moe,
)
from modelkit.testing.configs import FAMILIES, tiny_config
from modelkit.testing.dylora import build_dylora, write_dylora, write_dylora_run
from modelkit.testing.faults import (
    write_absurd_header,
    write_escaping_symlink,
    write_evil_pickle,
    write_index_outside,
    write_malformed_config,
    write_offsets_outside,
    write_overlapping_offsets,
    write_truncated_safetensors,
)
from modelkit.testing.peft_lora import write_peft_lora
from modelkit.testing.plain import build_tiny_model, write_plain_hf
from modelkit.testing.tokenizer import tiny_tokenizer, write_tokenizer

__all__ = [
    "ENTRIES",
    "FAMILIES",
    "GROUPS",
    "build_dylora",
    "build_tiny_model",
    "expected_expert_weights",
    "load_catalog",
    "naive_expert",
    "reconstruct_expert",
    "tiny_config",
    "tiny_tokenizer",
    "write_absurd_header",
    "write_catalog",
    "write_compressed_moe",
    "write_dylora",
    "write_dylora_run",
    "write_escaping_symlink",
    "write_evil_pickle",
    "write_index_outside",
    "write_malformed_config",
    "write_offsets_outside",
    "write_overlapping_offsets",
    "write_peft_lora",
    "write_plain_hf",
    "write_tokenizer",
    "write_truncated_safetensors",
]
