"""Batched decoding of many tenants' requests (``cotune.tenants.generation``) on SmolLM2-135M-Instruct.

Proven here, each against an independent reference:
* three tenants of different families (lowrank, kron, loretta_adp) plus the base, decoded together with
  prompts of different lengths, give exactly the greedy tokens each gives decoded alone;
* the lowrank tenant's tokens equal Hugging Face ``generate`` on the adapter loaded by PEFT, and the base rows'
  equal ``generate`` on the plain model;
* sampling is reproducible per row from its seed, whatever else is in the batch; stop tokens, ``max_new_tokens``
  and ``on_token`` end a row with the right reason.
"""

from __future__ import annotations

import pytest
import torch

from cotune.models import load_model, load_tokenizer
from cotune.tenants import BASE, DecodeRequest, TenantBank, decode

QUESTIONS = ["Name a primary colour.", "What is two plus two? Answer in one word, then explain why in detail.", "Hi"]
#: tenant -> (family, options, scale of the random weights added so that it answers unlike the base)
FAMILIES = {"t_lora": ("lowrank", {"r": 4, "target_modules": ["q_proj", "v_proj"]}, 0.5),
            "t_kron": ("kron", {"target_modules": ["o_proj"]}, 0.05),
            "t_tt": ("loretta_adp", {}, 0.05)}
NEW = 8


@pytest.fixture(scope="module")
def smol():
    tok = load_tokenizer("smollm2")
    bank = TenantBank(load_model("smollm2", "causal_lm").eval())
    g = torch.Generator().manual_seed(0)
    for tid, (family, opts, scale) in FAMILIES.items():
        bank.add_tenant(tid, _config(family, opts))
        with torch.no_grad():  # non-zero adapters: every tenant answers differently from the base
            for p in bank.parameters(tid).values():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        bank.set_trainable(False, [tid])
    return bank, tok


def _config(family, opts):
    from cotune.adapters.registry import make_config

    return make_config(family, **opts)


def _prompt(tok, q: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _stops(tok) -> frozenset[int]:
    return frozenset({tok.eos_token_id})


def _alone(bank, tok, tenant, prompt, **kw):
    r = DecodeRequest(tenant, prompt, NEW, _stops(tok), **kw)
    decode(bank, [r], tok.pad_token_id or 0)
    return r


def test_mixed_tenants_decode_exactly_as_each_alone(smol):
    bank, tok = smol
    tenants = [*FAMILIES, BASE]
    reqs = [DecodeRequest(t, _prompt(tok, QUESTIONS[i % 3]), NEW, _stops(tok)) for i, t in enumerate(tenants)]
    assert len({len(r.prompt) for r in reqs}) > 1  # prompts of different lengths: real left padding
    decode(bank, reqs, tok.pad_token_id or 0)
    alone = [_alone(bank, tok, r.tenant, r.prompt) for r in reqs]
    assert [r.tokens for r in reqs] == [a.tokens for a in alone]
    for r in reqs[:-1]:  # each tenant's model really answers otherwise than the base
        assert r.tokens and r.tokens != _alone(bank, tok, BASE, r.prompt).tokens, r.tenant


def test_lowrank_tenant_equals_peft_generate_and_base_equals_plain_generate(smol, tmp_path):
    from peft import PeftModel

    bank, tok = smol
    prompt = _prompt(tok, QUESTIONS[1])
    ours = _alone(bank, tok, "t_lora", prompt)
    base_rows = _alone(bank, tok, BASE, prompt)
    bank.save_tenant("t_lora", tmp_path / "lora")
    ids = torch.tensor([prompt])

    def hf(model):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        return [t for t in out[0, len(prompt):].tolist() if t != tok.eos_token_id]

    plain = load_model("smollm2", "causal_lm").eval()
    assert base_rows.tokens == hf(plain)
    peft = PeftModel.from_pretrained(plain, str(tmp_path / "lora")).eval()
    assert ours.tokens == hf(peft)
    assert ours.tokens != base_rows.tokens


def test_sampling_follows_each_rows_seed_and_stops(smol):
    bank, tok = smol
    prompt = _prompt(tok, QUESTIONS[0])
    kw = {"temperature": 0.9, "top_p": 0.8, "seed": 7}
    a = _alone(bank, tok, "t_kron", prompt, **kw)
    mixed = [DecodeRequest("t_lora", prompt, NEW, _stops(tok), temperature=1.0, seed=1),
             DecodeRequest("t_kron", prompt, NEW, _stops(tok), **kw)]
    decode(bank, mixed, tok.pad_token_id or 0)
    assert mixed[1].tokens == a.tokens  # another row's draws do not shift this row's
    seen: list[int] = []
    cut = DecodeRequest("t_tt", prompt, NEW, _stops(tok), on_token=lambda t: seen.append(t) or len(seen) == 2)
    short = DecodeRequest("t_tt", prompt, 3, _stops(tok))
    decode(bank, [cut, short], tok.pad_token_id or 0)
    assert cut.finish_reason == "stop" and cut.tokens == seen and len(seen) == 2
    assert short.finish_reason == "length" and len(short.tokens) == 3
    first = _alone(bank, tok, "t_tt", prompt).tokens[0]
    stopped = DecodeRequest("t_tt", prompt, NEW, frozenset({first}))
    decode(bank, [stopped], 0)
    assert stopped.tokens == [] and stopped.finish_reason == "stop"
