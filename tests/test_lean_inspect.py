"""A warm-cache `modelkit inspect` of every catalog format imports neither torch nor
transformers (their imports cost 1.5-4 s and 250-450 MB; the facts inspect needs are
cached on disk by modelkit.architecture.facts) nor pydantic (the configs it already
checked are remembered by modelkit.schemas), and reports exactly what a cold inspect reports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import modelkit
from modelkit.architecture.facts import causal_lm_type, config_facts, declares_field
from modelkit.architecture.bridge import load_config
from modelkit.testing.catalog import ENTRIES

# every readable artifact of the four formats (the bad-file group has no format of its own)
FORMAT_ENTRIES = [e.name for e in ENTRIES if e.group != "bad" and e.raises is None]

CHILD = r"""
import contextlib, io, json, sys
from modelkit.ui.cli import main
first = {}
for path in sys.argv[1:]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        main(["inspect", path, "--json"])
    for mod in ("torch", "transformers", "peft", "pydantic", "huggingface_hub.hf_api"):
        if mod in sys.modules and mod not in first:
            first[mod] = path
print(json.dumps(first))
"""


def test_warm_inspect_of_every_format_imports_no_torch_transformers_or_pydantic(catalog, tmp_path):
    # the base-unavailable entries look their base up in the HF cache: a folder check, not hf_api
    paths = [str(catalog[name]) for name in (*FORMAT_ENTRIES, "peft-lora-base-unavailable",
                                             "compressed-base-unavailable")]
    assert {e.format for e in ENTRIES if e.name in FORMAT_ENTRIES} == {
        "plain-hf", "peft-lora", "dylora-moe", "compressed-moe"}
    env = {**os.environ, "MODELKIT_CACHE": str(tmp_path / "cache")}
    # cold: the first inspect of each architecture may import them (and fills the cache)
    subprocess.run([sys.executable, "-c", CHILD, *paths], env=env, check=True, capture_output=True)
    warm = subprocess.run([sys.executable, "-c", CHILD, *paths], env=env, check=True,
                          capture_output=True, text=True)
    imported = json.loads(warm.stdout.strip().splitlines()[-1])
    assert imported == {}, f"warm-cache inspect imported {imported} (module: first artifact that did)"


def test_warm_inspect_reports_what_a_cold_one_does(catalog, tmp_path):
    env = {**os.environ, "MODELKIT_CACHE": str(tmp_path / "cache")}
    code = ("import json, sys, modelkit\n"
            "print(json.dumps([modelkit.inspect(p).to_dict() for p in sys.argv[1:]], default=str))")
    # the base-unavailable entries look their base up in the HF cache: a folder check, not hf_api
    paths = [str(catalog[name]) for name in (*FORMAT_ENTRIES, "peft-lora-base-unavailable",
                                             "compressed-base-unavailable")]
    runs = [subprocess.run([sys.executable, "-c", code, *paths], env=env, check=True,
                           capture_output=True, text=True).stdout for _ in range(2)]
    assert runs[0] == runs[1]


def test_config_facts_are_the_config_objects_values(catalog):
    for name in ("plain-llama", "plain-qwen3-moe-sharded", "base-gemma"):
        file = Path(catalog[name]) / "config.json"
        real = load_config(file)
        for _ in range(2):  # computed, then from the cache
            facts = config_facts(file)
            for attr in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size",
                         "tie_word_embeddings"):
                assert getattr(facts, attr) == getattr(real, attr), (name, attr)
            assert facts.dtype == str(real.dtype).removeprefix("torch.")
    moe = config_facts(Path(catalog["plain-qwen3-moe-sharded"]) / "config.json")
    assert moe.num_experts == load_config(catalog["plain-qwen3-moe-sharded"]).num_experts
    # an alias of the attribute_map resolves as on the config object
    assert config_facts(Path(catalog["plain-llama"]) / "config.json").num_attention_heads > 0


def test_edited_config_is_not_answered_from_the_cache(tmp_path, catalog):
    folder = tmp_path / "edited"
    folder.mkdir()
    cfg = json.loads((Path(catalog["plain-llama"]) / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg))
    before = config_facts(folder / "config.json").num_hidden_layers
    cfg["num_hidden_layers"] = before + 1
    (folder / "config.json").write_text(json.dumps(cfg))
    assert config_facts(folder / "config.json").num_hidden_layers == before + 1


def test_architecture_facts_match_transformers():
    assert causal_lm_type("GemmaForCausalLM") == "gemma"
    assert causal_lm_type("Qwen3MoeForCausalLM") == "qwen3_moe"
    assert causal_lm_type("NoSuchForCausalLM") is None
    assert declares_field("qwen3_moe", "num_experts") and not declares_field("gemma", "num_experts")
    assert not declares_field("no-such-architecture", "num_experts")


def test_inspect_in_process_still_matches_from_a_ready_config(catalog):
    # a config object passes through config_facts untouched
    real = load_config(catalog["plain-llama"])
    assert config_facts(real) is real
    assert modelkit.inspect(catalog["peft-lora"]).errors == []


def test_a_remembered_config_is_still_refused_once_edited(tmp_path, monkeypatch):
    from modelkit import schemas
    from modelkit.errors import ConfigError

    monkeypatch.setenv("MODELKIT_CACHE", str(tmp_path / "cache"))
    good = {"model_type": "llama", "num_hidden_layers": 2, "lora_alpha": 16.0}
    assert schemas.validate(good, "config.json") is good
    assert len(list((tmp_path / "cache" / "valid").iterdir())) == 1
    assert schemas.validate(dict(good), "config.json") == good            # remembered
    for bad in ({**good, "num_hidden_layers": "2"}, {**good, "num_hidden_layers": True},
                {**good, "lora_alpha": float("nan")}, {**good, "num_hidden_layers": 10**7}):
        with pytest.raises(ConfigError, match="config.json"):
            schemas.validate(bad, "config.json")
    # int keys would print as the JSON strings of a valid file: never remembered, always checked
    index = {"weight_map": {"a.weight": "model.safetensors"}}
    schemas.validate(index, "model.safetensors.index.json")
    with pytest.raises(ConfigError):
        schemas.validate({"weight_map": {1: "model.safetensors"}}, "model.safetensors.index.json")
    assert len(list((tmp_path / "cache" / "valid").iterdir())) == 2       # failures are not remembered
    monkeypatch.setenv("MODELKIT_CACHE", "off")
    with pytest.raises(ConfigError):
        schemas.validate({**good, "num_hidden_layers": -1}, "config.json")
