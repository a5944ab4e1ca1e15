"""DyLoRA-MoE as a real module: routing against hand-written references, generate, lm-eval,
missing parts, and ``AutoModelForCausalLM.from_pretrained`` after ``import modelkit``.

The references below use only the files (``torch.load`` / safetensors) and plain
transformers models: the router's choice is computed from the base model's last hidden
state by hand, and each expert is merged by hand as ``W + scaling * B @ A``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import modelkit  # noqa: F401  (registers dylora-moe with transformers' Auto classes)
from modelkit.formats.open import open_artifact, open_base
from modelkit.errors import BaseModelUnavailableError, LoadError
from modelkit.formats.dylora_build import build_dylora_model
from modelkit.models.dylora import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from modelkit.testing import tiny_tokenizer, write_dylora, write_plain_hf

E = 3              # experts in the fixtures
R, ALPHA = 4, 8    # write_dylora's defaults: scaling 2.0
TEMPERATURE = 2.0
PROMPTS = [
    "def f(x):\n    return x * 3 + 1",
    "the model loads tensor from disk and router picks one expert",
    "import torch",
    "for i in range(9): print(i)",
    "merge scale lora base config save load export diff",
    "attention query key value output hidden state",
]


# --------------------------------------------------------------------------- fixtures


class Fixtures:
    def __init__(self, root: Path):
        self.root = root
        self.base = write_plain_hf(root / "base-gemma", family="gemma", tie=False)
        self._written: dict[tuple, Path] = {}

    def layout(self, layout: str = "b", **kw) -> Path:
        key = (layout, tuple(sorted(kw.items())))
        if key not in self._written:
            name = "-".join([layout] + [f"{k}={v}" for k, v in sorted(kw.items())]).replace("/", "_")
            self._written[key] = write_dylora(self.root / name, layout, self.base, num_experts=E, **kw)
        return self._written[key]


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fixtures:
    return Fixtures(tmp_path_factory.mktemp("dylora-model"))


@pytest.fixture(scope="module")
def model_b(fx) -> DyLoRAMoEForCausalLM:
    art = open_artifact(fx.layout("b"))
    return build_dylora_model(art, open_base(art), routing="router")


@pytest.fixture(scope="module")
def ref(fx) -> "Reference":
    return Reference(fx.base, fx.layout("b"))


def batch(prompts: list[str], side: str = "right"):
    tok = tiny_tokenizer()
    tok.padding_side = side
    enc = tok(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as generate() computes them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------- hand reference


class Reference:
    """The definition in docs/dylora-routing.md, written out from the stored files."""

    def __init__(self, base_dir: Path, best: Path):
        from transformers import AutoModelForCausalLM

        self.base_dir = base_dir
        self.base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        router = torch.load(best / "dylo_moe_state" / "router.pt", weights_only=True)
        self.gate_w, self.gate_b = router["gate_state_dict"]["weight"], router["gate_state_dict"]["bias"]
        cfg = json.loads((best / "config.json").read_text())
        self.scaling = cfg["_dylora_lora_alpha"] / cfg["_dylora_lora_r"]
        self.experts = [torch.load(best / "peft_adapters" / f"expert_{k}.pt", weights_only=True)
                        for k in range(E)]

    @torch.no_grad()
    def router_logits(self, ids, mask, pos=None) -> torch.Tensor:
        h = self.base(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states[-1]
        return h @ self.gate_w.T + self.gate_b                        # [B, T, E]

    def choice(self, ids, mask, pos=None) -> list[int]:
        """Top-1 per token, averaged over real tokens, argmax."""
        votes = F.one_hot(self.router_logits(ids, mask, pos).argmax(-1), E).float() * mask[..., None]
        return (votes.sum(1) / mask.sum(1, keepdim=True)).argmax(-1).tolist()

    def mean_weights(self, ids, mask) -> torch.Tensor:
        probs = F.softmax(self.router_logits(ids, mask) / TEMPERATURE, dim=-1) * mask[..., None]
        return probs.sum(1) / mask.sum(1, keepdim=True)               # [B, E]

    def merged(self, weights: list[float]):
        """The base with ``sum_i w_i * scaling * B_i @ A_i`` added to every adapted weight."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32).eval()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, w in enumerate(weights):
                if w == 0:
                    continue
                for name, a in self.experts[k].items():
                    if ".lora_A." not in name:
                        continue
                    b = self.experts[k][name.replace(".lora_A.", ".lora_B.")]
                    module = name.removeprefix("base_model.model.").split(".lora_A.")[0]
                    params[f"{module}.weight"] += w * self.scaling * (b @ a)
        return model


def one_hot(k: int) -> list[float]:
    return [1.0 if i == k else 0.0 for i in range(E)]


# --------------------------------------------------------------------------- routing


def test_router_picks_the_reference_expert_and_runs_only_it(model_b, ref):
    ids, mask = batch(PROMPTS)
    out = model_b(input_ids=ids, attention_mask=mask)
    expected = ref.choice(ids, mask)
    assert out.routing_weights.argmax(-1).tolist() == expected
    assert len(set(expected)) > 1, "the fixture prompts should not all pick one expert"
    for b, k in enumerate(expected):
        n = int(mask[b].sum())
        with torch.no_grad():
            want = ref.merged(one_hot(k))(ids[b:b + 1, :n]).logits[0]
        torch.testing.assert_close(out.logits[b, :n], want, atol=1e-5, rtol=0)


def test_router_weights_are_the_sequence_mean_of_top1_votes(model_b, ref):
    ids, mask = batch(PROMPTS[:3])
    out = model_b(input_ids=ids, attention_mask=mask)
    votes = F.one_hot(ref.router_logits(ids, mask).argmax(-1), E).float() * mask[..., None]
    torch.testing.assert_close(out.router_weights, votes.sum(1) / mask.sum(1, keepdim=True))


@pytest.mark.parametrize("side", ["left", "right", "right-no-mask"])
def test_padding_changes_neither_choice_nor_logits(model_b, side):
    alone = []
    for p in PROMPTS:
        ids, _ = batch([p])
        out = model_b(input_ids=ids)
        alone.append((out.routing_weights.argmax(-1).item(), out.logits[0]))
    ids, mask = batch(PROMPTS, "left" if side == "left" else "right")
    if side == "left":  # generate() and lm-eval's generate_until pad left, with position ids
        out = model_b(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
    elif side == "right":
        out = model_b(input_ids=ids, attention_mask=mask)
    else:  # lm-eval's loglikelihood: right-padded with 0, no attention mask
        out = model_b(input_ids=ids * mask)
    assert out.routing_weights.argmax(-1).tolist() == [k for k, _ in alone]
    for b, (_, logits) in enumerate(alone):
        n = logits.shape[0]
        got = out.logits[b, -n:] if side == "left" else out.logits[b, :n]
        torch.testing.assert_close(got, logits, atol=1e-5, rtol=0)


def test_expert_k_equals_the_dense_merge_exported_by_the_format(fx, model_b, ref):
    from modelkit.architecture.bridge import disk_to_model

    art = open_artifact(fx.layout("b"))
    base = open_base(art)
    ids, mask = batch(PROMPTS[:3])
    for k in range(E):
        view = art.view(base, expert=k)
        dense, info = disk_to_model(art.config(), {n: t.produce for n, t in view.tensors.items()}, torch.float32)
        assert info.ok
        model_b.set_routing(f"expert:{k}")
        try:
            with torch.no_grad():
                got = model_b(input_ids=ids, attention_mask=mask)
                want = dense(input_ids=ids, attention_mask=mask).logits
        finally:
            model_b.set_routing("router")
        assert got.routing_weights.argmax(-1).tolist() == [k] * 3
        torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(want, ref.merged(one_hot(k))(input_ids=ids, attention_mask=mask).logits,
                                       atol=1e-5, rtol=0)


def test_mean_routing_is_the_router_weighted_mixture(fx, ref):
    art = open_artifact(fx.layout("b"))
    model = build_dylora_model(art, open_base(art), routing="mean")
    ids, mask = batch(PROMPTS[:3])
    out = model(input_ids=ids, attention_mask=mask)
    weights = ref.mean_weights(ids, mask)
    torch.testing.assert_close(out.routing_weights, weights)
    for b in range(3):
        n = int(mask[b].sum())
        with torch.no_grad():
            want = ref.merged(weights[b].tolist())(ids[b:b + 1, :n]).logits[0]
        torch.testing.assert_close(out.logits[b, :n], want, atol=1e-5, rtol=0)
    prompt = ids[:1, :int(mask[0].sum())]          # generate keeps the prompt's mixture
    want = ref.merged(weights[0].tolist()).generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0).tolist() == want.tolist()


# --------------------------------------------------------------------------- generate, lm-eval


def test_generate_routes_once_from_the_prompt(model_b, ref):
    ids, mask = batch(PROMPTS[:4], "left")
    chosen = ref.choice(ids, mask, positions(mask))
    out = model_b.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                           pad_token_id=0)
    for b, k in enumerate(chosen):
        prompt = ids[b][mask[b].bool()].unsqueeze(0)
        want = ref.merged(one_hot(k)).generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        new = want[0, prompt.shape[1]:]
        assert out[b, ids.shape[1]:ids.shape[1] + len(new)].tolist() == new.tolist()
    beams = model_b.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2,
                             num_return_sequences=2, do_sample=False, pad_token_id=0)
    assert beams.shape[0] == 8


def test_continuing_a_cache_needs_the_prompt_routing(model_b):
    ids, _ = batch(PROMPTS[:1])
    first = model_b(input_ids=ids, use_cache=True)
    step = torch.tensor([[5]])
    with pytest.raises(ValueError, match="routing_weights"):
        model_b(input_ids=step, past_key_values=first.past_key_values)
    nxt = model_b(input_ids=step, past_key_values=first.past_key_values, routing_weights=first.routing_weights)
    whole = model_b(input_ids=torch.cat([ids, step], 1), routing_weights=first.routing_weights)
    torch.testing.assert_close(nxt.logits[0, -1], whole.logits[0, -1], atol=1e-5, rtol=0)


def test_lm_eval_hflm_scores_do_not_depend_on_batch_size(model_b):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tok = tiny_tokenizer()
    pairs = [(p.split(" ", 1)[0], " " + p.split(" ", 1)[1]) for p in PROMPTS]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    scores = {}
    for size in (1, 4):
        lm = HFLM(pretrained=model_b, tokenizer=tok, batch_size=size, backend="causal")
        scores[size] = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    assert scores[1] == pytest.approx(scores[4], abs=1e-4)


# --------------------------------------------------------------------------- missing and stray parts


def test_missing_router_is_a_load_error_unless_one_expert_is_asked_for(fx):
    art = open_artifact(fx.layout("b", fault="missing-router"))
    for routing in ("router", "mean"):
        with pytest.raises(LoadError, match="router"):
            build_dylora_model(art, open_base(art), routing=routing)
    model = build_dylora_model(art, open_base(art), routing="expert:2")
    assert model(input_ids=batch(PROMPTS[:2])[0]).routing_weights.argmax(-1).tolist() == [2, 2]
    with pytest.raises(LoadError, match="router"):
        model.set_routing("router")


def test_a_stored_tensor_the_model_does_not_use_is_a_load_error(fx, tmp_path):
    import shutil

    best = shutil.copytree(fx.layout("b"), tmp_path / "best_model")
    state = torch.load(best / "dylo_moe_state" / "router.pt", weights_only=True)
    torch.save({**state, "gate_scale": torch.ones(E)}, best / "dylo_moe_state" / "router.pt")
    art = open_artifact(best)
    with pytest.raises(LoadError, match=r"not used by the model.*gate_scale"):
        build_dylora_model(art, open_base(art))


def test_two_router_copies_that_disagree_are_a_load_error(fx, tmp_path):
    import shutil

    out = shutil.copytree(fx.layout("a-tiny-config").parent, tmp_path / "run")
    state = torch.load(out / "dylo_moe_state" / "router.pt", weights_only=True)
    state["gate_state_dict"]["weight"] = state["gate_state_dict"]["weight"] + 1
    torch.save(state, out / "dylo_moe_state" / "router.pt")
    art = open_artifact(out / "best_model")
    with pytest.raises(LoadError, match="two copies of the router disagree"):
        build_dylora_model(art, open_base(art))


def test_all_layouts_build_the_same_module(fx, model_b):
    ids, mask = batch(PROMPTS[:3])
    want = model_b(input_ids=ids, attention_mask=mask).logits
    for layout in ("a-tiny-config", "c"):
        art = open_artifact(fx.layout(layout))
        model = build_dylora_model(art, open_base(art))
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want, atol=1e-6, rtol=0)
        assert set(model.state_dict()) == set(model_b.state_dict())
    assert "router.gate.weight" in model_b.state_dict()   # the training wrapper's names (layout a)
    assert "foundation_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.expert_2.weight" \
        in model_b.state_dict()
    assert model_b.origins["router.gate.weight"] == "stored:dylo_moe_state/router.pt"


def test_dtype_applies_to_base_and_experts_while_the_router_stays_fp32(fx, model_b):
    art = open_artifact(fx.layout("b"))
    model = build_dylora_model(art, open_base(art), dtype="bfloat16")
    assert model.lm.dtype == torch.bfloat16 and model.router.gate.weight.dtype == torch.float32
    ids, mask = batch(PROMPTS)
    out = model(input_ids=ids, attention_mask=mask)
    assert out.logits.dtype == torch.bfloat16
    assert out.routing_weights.argmax(-1).tolist() == \
        model_b(input_ids=ids, attention_mask=mask).routing_weights.argmax(-1).tolist()


# --------------------------------------------------------------------------- Auto classes


def test_auto_model_opens_a_dylora_folder_with_no_config_rewriting(fx, model_b):
    from transformers import AutoConfig, AutoModelForCausalLM

    best = fx.layout("b")
    before = (best / "config.json").read_text()
    config = AutoConfig.from_pretrained(best)
    assert isinstance(config, DyLoRAMoEConfig) and config.text_config.model_type == "gemma"
    assert config.num_experts == E and config.lora_r == R and config.lora_alpha == ALPHA
    model = AutoModelForCausalLM.from_pretrained(best)
    assert isinstance(model, DyLoRAMoEForCausalLM) and model.routing == "router"
    ids, mask = batch(PROMPTS[:3])
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               model_b(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    one = AutoModelForCausalLM.from_pretrained(best, routing="expert:1")
    assert one(input_ids=ids).routing_weights.argmax(-1).tolist() == [1, 1, 1]
    assert (best / "config.json").read_text() == before


def test_auto_model_opens_tiny_configs_and_checkpoints_when_the_base_is_found(fx, model_b):
    from transformers import AutoModelForCausalLM

    ids = batch(PROMPTS[:2])[0]
    for layout in ("a-tiny-config", "c"):
        model = AutoModelForCausalLM.from_pretrained(fx.layout(layout))
        torch.testing.assert_close(model(input_ids=ids).logits, model_b(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_auto_model_without_its_base_says_so(fx):
    from transformers import AutoModelForCausalLM

    for layout in ("a-tiny-config", "b"):
        folder = fx.layout(layout, base_name="google/codegemma-2b")
        with pytest.raises(BaseModelUnavailableError, match="codegemma-2b"):
            AutoModelForCausalLM.from_pretrained(folder)


def test_auto_model_never_runs_remote_code(fx):
    from transformers import AutoModelForCausalLM

    best = fx.layout("b", fault="remote-code")
    assert isinstance(AutoModelForCausalLM.from_pretrained(best), DyLoRAMoEForCausalLM)
    assert not (best / "REMOTE_CODE_EXECUTED").exists()


def test_save_pretrained_reloads_as_the_same_routed_model(fx, model_b, tmp_path):
    from transformers import AutoModelForCausalLM

    model_b.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    ids, mask = batch(PROMPTS[:3])
    torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits,
                               model_b(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    assert again.config.router_top_k == model_b.config.router_top_k and again.routing == "router"


_ORDER_SCRIPT = """
import sys
{first}
assert "torch" not in sys.modules or "transformers" in sys.modules, "import modelkit imported torch"
{second}
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({folder!r})
print(type(model).__name__, float(model(input_ids=__import__("torch").tensor([[2, 10, 20]])).logits.detach().sum()))
"""


@pytest.mark.parametrize("order", ["modelkit-first", "transformers-first"])
def test_registration_works_in_either_import_order(fx, model_b, order):
    imports = ["import modelkit\nassert 'transformers' not in sys.modules", "import transformers"]
    if order == "transformers-first":
        imports = ["import transformers", "import modelkit"]
    script = _ORDER_SCRIPT.format(first=imports[0], second=imports[1], folder=str(fx.layout("b")))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    name, total = done.stdout.split()
    assert name == "DyLoRAMoEForCausalLM"
    with torch.no_grad():
        want = float(model_b(input_ids=torch.tensor([[2, 10, 20]])).logits.sum())
    assert float(total) == pytest.approx(want, abs=1e-3)
