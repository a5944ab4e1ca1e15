"""Every DyLoRA-MoE routing mode against a reference written from FORMATS.md §3.1 alone.

The reference uses a stock transformers model of the tied, bf16-config base (loaded in
float32), the expert tensors read with ``torch.load`` from ``peft_adapters/expert_k.pt``
and the gate from ``dylo_moe_state/router.pt``; each adapted linear gets
``sum_i w_t,i * scaling * B_i A_i x_t`` added by a forward hook. No PEFT, no modelkit code.
Tolerance: 1e-5 on float32 logits.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import modelkit
from modelkit.testing import tiny_tokenizer, write_dylora, write_plain_hf

E = 3
TEMPERATURE = 2.0
TOL = dict(atol=1e-5, rtol=0)
PROMPTS = ["def f(x):\n    return x * 3 + 1", "the router picks one expert per token",
           "import torch", "attention query key value output hidden state"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("routing")
    base = write_plain_hf(root / "gemma-tied", "gemma", dtype=torch.bfloat16)  # ties lm_head, bf16 config
    return base, write_dylora(root / "run", "b", base, num_experts=E)


class Reference:
    """The evaluation forwards of the real code, from the facts in FORMATS.md §3.1."""

    def __init__(self, base: Path, best: Path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        router = torch.load(best / "dylo_moe_state" / "router.pt", weights_only=True)
        self.w, self.b = router["gate_state_dict"]["weight"], router["gate_state_dict"]["bias"]
        alpha = json.loads((best / "config.json").read_text())["_dylora_lora_alpha"]
        self.experts = []  # per expert: {module: (A, B, scaling)}
        for k in range(E):
            stored = torch.load(best / "peft_adapters" / f"expert_{k}.pt", weights_only=True)
            mods = {}
            for name, a in stored.items():
                if ".lora_A." in name:
                    module = name.removeprefix("base_model.model.").split(".lora_A.")[0]
                    b = stored[name.replace(".lora_A.", ".lora_B.")]
                    mods[module] = (a, b, alpha / a.shape[0])
            self.experts.append(mods)

    @torch.no_grad()
    def run(self, ids: torch.Tensor, weights: torch.Tensor, hidden: bool = False):
        """The base forward with ``sum_i weights[b, t, i] * s_i B_i A_i x`` on every adapted layer."""
        handles = []
        for module in self.experts[0]:
            def hook(mod, args, out, module=module):
                x = args[0]
                for i, mods in enumerate(self.experts):
                    a, b, s = mods[module]
                    out = out + weights[..., i:i + 1] * s * (x @ a.T @ b.T)
                return out
            handles.append(self.model.get_submodule(module).register_forward_hook(hook))
        try:
            out = self.model(ids, output_hidden_states=hidden)
        finally:
            for h in handles:
                h.remove()
        return out

    def constant(self, ids, w: torch.Tensor) -> torch.Tensor:
        return w[:, None, :].expand(ids.shape[0], ids.shape[1], E)

    def router_logits(self, ids, router_pass: int | None = None) -> torch.Tensor:
        w = torch.zeros(ids.shape[0], ids.shape[1], E)
        if router_pass is not None:
            w[..., router_pass] = 1.0
        h = self.run(ids, w, hidden=True).hidden_states[-1]
        return h @ self.w.T + self.b

    def votes(self, ids, router_pass=None) -> torch.Tensor:
        return F.one_hot(self.router_logits(ids, router_pass).argmax(-1), E).float()   # top-1, eval mode

    def token(self, ids, router_pass=None):
        return self.run(ids, self.votes(ids, router_pass)).logits

    def vote(self, ids, router_pass=None):
        share = self.votes(ids, router_pass).mean(1)                                   # [B, E]
        return sum(share[:, i, None, None] * self.run(ids, self.constant(ids, F.one_hot(
            torch.tensor([i] * ids.shape[0]), E).float())).logits for i in range(E))

    def router(self, ids, router_pass=None):
        k = self.votes(ids, router_pass).mean(1).argmax(-1)
        return self.run(ids, self.constant(ids, F.one_hot(k, E).float())).logits, k.tolist()

    def mean(self, ids):
        w = F.softmax(self.router_logits(ids) / TEMPERATURE, dim=-1).mean(1)
        return self.run(ids, self.constant(ids, w)).logits

    def expert(self, ids, k: int):
        return self.run(ids, self.constant(ids, F.one_hot(torch.tensor([k] * ids.shape[0]), E).float())).logits


@pytest.fixture(scope="module")
def ref(artifact) -> Reference:
    return Reference(*artifact)


def ids_of(prompt: str) -> torch.Tensor:
    return tiny_tokenizer()(prompt, return_tensors="pt")["input_ids"]


def routed(artifact, routing: str, **kw):
    return modelkit.load(artifact[1], routing=routing, dtype="float32", **kw).model


@pytest.mark.parametrize("prompt", PROMPTS)
def test_token_routing_is_the_fork_era_evaluation_forward(artifact, ref, prompt):
    ids = ids_of(prompt)
    with torch.no_grad():
        torch.testing.assert_close(routed(artifact, "token")(ids).logits, ref.token(ids), **TOL)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_vote_routing_is_the_pre_fork_evaluation_forward(artifact, ref, prompt):
    ids = ids_of(prompt)
    with torch.no_grad():
        torch.testing.assert_close(routed(artifact, "vote")(ids).logits, ref.vote(ids), **TOL)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_router_routing_is_generates_one_expert_per_sequence(artifact, ref, prompt):
    ids = ids_of(prompt)
    model = routed(artifact, "router")
    logits, choice = ref.router(ids)
    with torch.no_grad():
        out = model(ids)
    assert out.routing_weights.argmax(-1).tolist() == choice
    torch.testing.assert_close(out.logits, logits, **TOL)


def test_mean_and_every_expert(artifact, ref):
    ids = ids_of(PROMPTS[0])
    with torch.no_grad():
        torch.testing.assert_close(routed(artifact, "mean")(ids).logits, ref.mean(ids), **TOL)
        for k in range(E):
            torch.testing.assert_close(routed(artifact, f"expert:{k}")(ids).logits, ref.expert(ids, k), **TOL)
            dense = modelkit.load(artifact[1], expert=k, dtype="float32").model
            torch.testing.assert_close(dense(ids).logits, ref.expert(ids, k), **TOL)


def test_router_pass_with_an_expert_active(artifact, ref):
    """The original ran the router pass with whatever adapter was active (after a pre-fork
    forward: the last expert); router_pass='expert:K' reproduces that state."""
    ids = ids_of(PROMPTS[1])
    model = routed(artifact, "token", router_pass=f"expert:{E - 1}")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref.token(ids, router_pass=E - 1), **TOL)
        vote = routed(artifact, "vote", router_pass=f"expert:{E - 1}")
        torch.testing.assert_close(vote(ids).logits, ref.vote(ids, router_pass=E - 1), **TOL)


def test_the_modes_really_differ(artifact, ref):
    """So that the equalities above can fail: per-token routing mixes experts within a prompt."""
    ids = torch.cat([ids_of(p) for p in PROMPTS], dim=1)
    votes = ref.votes(ids)[0]
    assert len(set(votes.argmax(-1).tolist())) > 1
    with torch.no_grad():
        token, router = routed(artifact, "token")(ids).logits, routed(artifact, "router")(ids).logits
    assert (token - router).abs().max() > 1e-3


def test_generate_under_per_token_routing_reroutes_every_step(artifact, ref):
    ids = ids_of(PROMPTS[2])
    model = routed(artifact, "token")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        seq = ids
        for _ in range(4):  # greedy, the whole sequence through the reference each step
            seq = torch.cat([seq, ref.token(seq)[:, -1:].argmax(-1)], dim=1)
    assert out.tolist() == seq.tolist()


def test_unknown_modes_are_refused(artifact):
    with pytest.raises(modelkit.errors.LoadError, match="routing"):
        routed(artifact, "topk")
    with pytest.raises(modelkit.errors.LoadError, match="router_pass"):
        routed(artifact, "token", router_pass="all")
