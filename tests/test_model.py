"""Tests of tinylm.model and tinylm.attention: config, HF parity, KV cache, MLA, cost model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from tinylm.model import (
    GPT,
    GPTConfig,
    active_parameters,
    count_parameters,
    flops_per_token,
    kv_cache_bytes_per_token,
)
from tinylm.profile import flop_counter

# Tiny models: one thread is faster, and on a busy machine much faster (see the fixture).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 61
VARIANTS = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa", n_kv_head=2),
    "mqa": dict(attention="mqa"),
    "mla": dict(attention="mla", kv_lora_rank=12, rope_head_dim=4),
    "mla-qlora": dict(attention="mla", kv_lora_rank=12, rope_head_dim=4, q_lora_rank=16),
    "mla-absorbed": dict(attention="mla", kv_lora_rank=12, rope_head_dim=4),
}


def tiny(**overrides) -> GPTConfig:
    base = dict(vocab_size=VOCAB, context_length=24, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**(base | overrides))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every weight (norm scales too) O(1) random values, so logits differ clearly.

    With the 0.02 init the logits are almost uniform and a broken model could pass.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model


def make(variant: str = "mha", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = randomize(GPT(tiny(**(VARIANTS[variant] | overrides))), seed).eval()
    if variant == "mla-absorbed":
        model.set_mla_absorb(True)
    return model


def tokens(batch: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def left_pad_mask(n_pads: list[int], T: int) -> torch.Tensor:
    return torch.stack([torch.arange(T) >= n for n in n_pads])


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=30, n_head=4), r"n_head=4 does not divide n_embd=30"),
        (dict(n_embd=36, n_head=4), r"head_dim .* = 9 is odd"),
        (dict(attention="gqa", n_kv_head=3), r"n_kv_head=3 does not divide n_head=4"),
        (dict(attention="gqa"), r"'gqa' needs n_kv_head"),
        (dict(attention="mha", n_kv_head=2), r"use attention='gqa'"),
        (dict(attention="mqa", n_kv_head=2), r"'mqa' means n_kv_head=1"),
        (dict(attention="mla", n_kv_head=2), r"'mla' has one key/value per query head"),
        (dict(attention="mla", rope_head_dim=3), r"rope_head_dim=3 is odd"),
        (dict(attention="mla", kv_lora_rank=0), r"kv_lora_rank must be an integer >= 1"),
        (dict(attention="flash"), r"unknown attention='flash'"),
        (dict(mlp="sparse"), r"unknown mlp='sparse'"),
        (dict(moe_balance="magic"), r"unknown moe_balance='magic'"),
        (dict(mlp="moe", n_experts=2, experts_per_token=3), r"experts_per_token=3 > n_experts=2"),
        (dict(mlp="moe", n_shared_experts=-1), r"n_shared_experts must be an integer >= 0"),
        (dict(n_layer=0), r"n_layer must be an integer >= 1"),
        (dict(vocab_size=-5), r"vocab_size must be an integer >= 1"),
        (dict(n_embd=32.0), r"n_embd must be an integer"),
        (dict(norm_eps=0.0), r"norm_eps must be a number > 0"),
        (dict(tie_embeddings="yes"), r"tie_embeddings must be True or False"),
        (dict(position="alibi"), r"unknown position='alibi'"),
        (dict(norm_placement="sandwich"), r"unknown norm_placement='sandwich'"),
    ],
)
def test_config_rejects_bad_values_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_config_resolves_defaults_for_the_kind_in_use():
    c = GPTConfig()
    assert (c.n_kv_head, c.head_dim, c.mlp_hidden % 8) == (c.n_head, c.n_embd // c.n_head, 0)
    assert abs(c.mlp_hidden - 8 * c.n_embd / 3) <= 4
    assert 0.8e6 < count_parameters(c) < 1.3e6  # "about 1M parameters"
    assert GPTConfig(attention="mqa").n_kv_head == 1
    mla = GPTConfig(attention="mla")
    assert mla.kv_lora_rank > 0 and mla.rope_head_dim % 2 == 0 and mla.n_kv_head == mla.n_head
    assert c.kv_lora_rank is None  # not resolved for a kind not in use
    moe = GPTConfig(mlp="moe")
    assert isinstance(moe.expert_hidden, int) and moe.expert_hidden < GPTConfig().mlp_hidden


@pytest.mark.parametrize(
    "kwargs", [{}, VARIANTS["gqa"], VARIANTS["mla-qlora"], dict(mlp="moe", tie_embeddings=True)]
)
def test_config_round_trips_through_json(kwargs):
    c = tiny(**kwargs)
    assert GPTConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_from_dict_rejects_unknown_keys():
    d = tiny().to_dict() | {"n_layers": 3}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_layers'\]"):
        GPTConfig.from_dict(d)


# ----------------------------------------------------------------------------- the model


def test_init_is_seeded_nanogpt_style():
    c = GPTConfig()
    torch.manual_seed(0)
    a = GPT(c)
    torch.manual_seed(0)
    b = GPT(c)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    attn, mlp = a.blocks[0].attn, a.blocks[0].mlp
    resid = 0.02 / math.sqrt(2 * c.n_layer)
    assert attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert attn.o_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert mlp.down.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert torch.equal(a.norm.weight, torch.ones(c.n_embd))
    assert not any("rope" in k for k in a.state_dict())  # tables are not checkpointed
    assert all(m.bias is None for m in a.modules() if isinstance(m, nn.Linear))


def test_tied_embeddings_share_one_tensor():
    model = GPT(tiny(tie_embeddings=True))
    assert model.lm_head.weight is model.tok_emb.weight


HF_RENAMES = [  # tinylm name -> Hugging Face name (Llama and DeepSeek-V3 share the layout)
    ("tok_emb.", "model.embed_tokens."),
    ("blocks.", "model.layers."),
    (".attn_norm.", ".input_layernorm."),
    (".mlp_norm.", ".post_attention_layernorm."),
    (".attn.", ".self_attn."),
    ("mlp.gate.", "mlp.gate_proj."),
    ("mlp.up.", "mlp.up_proj."),
    ("mlp.down.", "mlp.down_proj."),
    ("kv_a_proj.", "kv_a_proj_with_mqa."),  # MLA
    ("kv_norm.", "kv_a_layernorm."),
    ("q_a_norm.", "q_a_layernorm."),
]


def check_against_hf(model: GPT, hf: nn.Module) -> None:
    """Copy our weights into the HF model and compare logits (fp32, atol 1e-5)."""
    state = {}
    for name, tensor in model.state_dict().items():
        name = "model.norm.weight" if name == "norm.weight" else name
        for old, new in HF_RENAMES:
            name = name.replace(old, new)
        state[name] = tensor
    hf.load_state_dict(state, strict=True)
    idx = tokens(2, model.config.context_length)
    with torch.no_grad():
        close(model(idx), hf.eval()(idx).logits)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(attention="gqa", n_kv_head=2),
        dict(attention="mqa", tie_embeddings=True, rope_theta=500.0),
    ],
)
def test_matches_hf_llama(kwargs):
    transformers = pytest.importorskip("transformers")
    model = make("mha", **kwargs)
    c = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.mlp_hidden,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head,
        max_position_embeddings=c.context_length,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings,
    )
    check_against_hf(model, transformers.LlamaForCausalLM(hf_config))


@pytest.mark.parametrize("variant", ["mla", "mla-qlora"])
def test_mla_matches_hf_deepseek_v3(variant):
    """MLA against DeepSeek-V3's attention in transformers (dense MLPs, half-split RoPE)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV3Config"):
        pytest.skip("this transformers has no DeepSeek-V3")
    # HF builds the q_a / kv_a norms with the default eps 1e-6, not rms_norm_eps: match it.
    model = make(variant, norm_eps=1e-6)
    c = model.config
    hf_config = transformers.DeepseekV3Config(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.mlp_hidden,
        num_hidden_layers=c.n_layer,
        first_k_dense_replace=c.n_layer,  # every layer dense: this test is about attention
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_head,
        kv_lora_rank=c.kv_lora_rank,
        q_lora_rank=c.q_lora_rank,
        qk_nope_head_dim=c.head_dim,
        v_head_dim=c.head_dim,
        qk_rope_head_dim=c.rope_head_dim,
        rope_interleave=False,
        max_position_embeddings=c.context_length,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings,
    )
    check_against_hf(model, transformers.DeepseekV3ForCausalLM(hf_config))


# ----------------------------------------------------------------------------- KV cache


def decode(
    model: GPT, idx: torch.Tensor, pad_mask: torch.Tensor | None, prefill: int
) -> torch.Tensor:
    """Logits of idx from a prefill of `prefill` tokens then one cached step per token.

    Like generation, the steps pass no pad_mask: all padding must lie inside the prefill.
    """
    cache = model.new_cache(idx.shape[0])
    pm = None if pad_mask is None else pad_mask[:, :prefill]
    out = [model(idx[:, :prefill], cache=cache, pad_mask=pm)]
    for t in range(prefill, idx.shape[1]):
        out.append(model(idx[:, t : t + 1], cache=cache))
    assert cache.pos == idx.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_cached_decode_matches_full_recompute(variant, batch):
    model, T = make(variant), 12
    idx = tokens(batch, T)
    pad_mask = left_pad_mask([0, 3, 4][:batch], T)
    full = model(idx, pad_mask=pad_mask)
    cached = decode(model, idx, pad_mask, prefill=5)
    close(cached[pad_mask], full[pad_mask])
    # Left padding does not change a row's logits: compare with each row run alone.
    for b, n_pad in enumerate([0, 3, 4][:batch]):
        close(full[b, n_pad:], model(idx[b : b + 1, n_pad:])[0])


@pytest.mark.parametrize("variant", ["mha", "gqa", "mla", "mla-absorbed"])
@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_chunked_prefill_matches_full_recompute(variant, batch):
    """A multi-token forward on a non-empty cache needs an offset causal mask."""
    model, T = make(variant), 10
    idx, pad_mask = tokens(batch, T), left_pad_mask([0, 2, 5][:batch], T)
    cache = model.new_cache(batch, max_len=T)
    first = model(idx[:, :4], cache=cache, pad_mask=pad_mask[:, :4])
    second = model(idx[:, 4:], cache=cache, pad_mask=pad_mask[:, 4:])
    full = model(idx, pad_mask=pad_mask)
    close(torch.cat([first, second], dim=1)[pad_mask], full[pad_mask])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mla", "mla-qlora"])
@torch.no_grad()
def test_mla_absorbed_path_equals_plain_path(variant):
    model, T = make(variant), 12
    idx, pad_mask = tokens(3, T), left_pad_mask([0, 1, 6], T)
    plain_full = model(idx, pad_mask=pad_mask)
    plain_cached = decode(model, idx, pad_mask, prefill=7)
    model.set_mla_absorb(True)
    assert all(block.attn.absorb for block in model.blocks)
    close(model(idx, pad_mask=pad_mask)[pad_mask], plain_full[pad_mask])
    close(decode(model, idx, pad_mask, prefill=7)[pad_mask], plain_cached[pad_mask])
    with pytest.raises(ValueError, match="needs attention='mla'"):
        make("mha").set_mla_absorb(True)


@torch.no_grad()
def test_pad_rows_give_no_nans():
    model = make("mha")
    pad_mask = left_pad_mask([0, 6], 6)  # second row is all padding
    cache = model.new_cache(2)
    logits = model(tokens(2, 6), cache=cache, pad_mask=pad_mask)
    logits = torch.cat([logits, model(tokens(2, 1), cache=cache)], dim=1)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa", "mla", "mla-qlora"])
def test_cache_allocates_what_kv_cache_bytes_per_token_says(variant, dtype):
    model = GPT(tiny(**VARIANTS[variant]))
    cache = model.new_cache(3, max_len=10, dtype=dtype)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer)
    assert held == cache.nbytes() == kv_cache_bytes_per_token(model.config, dtype) * 10 * 3
    assert all(t.dtype == dtype for layer in cache.layers for t in layer)


def test_kv_cache_bytes_formulas():
    c = GPTConfig(n_layer=3, n_head=8, n_embd=64, attention="gqa", n_kv_head=2)
    assert kv_cache_bytes_per_token(c) == 2 * 3 * 2 * 8 * 4
    c = GPTConfig(n_layer=3, attention="mla", kv_lora_rank=40, rope_head_dim=8)
    assert kv_cache_bytes_per_token(c, torch.float16) == 3 * (40 + 8) * 2


@torch.no_grad()
def test_cache_is_written_in_place():
    model = make("gqa")
    cache = model.new_cache(2)
    pointers = [t.data_ptr() for layer in cache.layers for t in layer]
    logits = model(tokens(2, 3), cache=cache)
    model(logits.argmax(-1)[:, -1:], cache=cache)
    assert [t.data_ptr() for layer in cache.layers for t in layer] == pointers
    assert cache.pos == 4 and cache.mask[:, :4].all() and not cache.mask[:, 4:].any()
    cache.reset()
    assert cache.pos == 0 and not cache.mask.any()


def test_too_long_inputs_name_both_numbers():
    model = make("mha")
    with pytest.raises(ValueError, match=r"25 tokens but context_length is 24"):
        model(tokens(1, 25))
    cache = model.new_cache(1, max_len=8)
    model(tokens(1, 6), cache=cache)
    with pytest.raises(ValueError, match=r"6 positions filled \+ 3 new = 9 > cache max_len 8"):
        model(tokens(1, 3), cache=cache)
    with pytest.raises(ValueError, match=r"max_len=30 .* context_length=24"):
        model.new_cache(1, max_len=30)
    with pytest.raises(ValueError, match=r"batch size 1 but idx has 2 rows"):
        model(tokens(2, 1), cache=cache)


def test_bfloat16_model_gets_a_bfloat16_cache():
    model = make("mla").to(torch.bfloat16)
    cache = model.new_cache(1)
    assert cache.layers[0][0].dtype == torch.bfloat16
    with torch.no_grad():
        assert model(tokens(1, 4), cache=cache).dtype == torch.bfloat16


def test_dense_aux_loss_is_zero():
    model = make("mha")
    model(tokens(1, 3))
    assert model.aux_loss().item() == 0.0


# ----------------------------------------------------------------------------- counting

COUNT_CONFIGS = [
    {},
    dict(tie_embeddings=True),
    dict(attention="gqa", n_kv_head=2, mlp_hidden=40),
    dict(attention="mqa", n_layer=3),
    dict(attention="mla"),
    dict(attention="mla", q_lora_rank=20, kv_lora_rank=10, rope_head_dim=6),
]
MOE_CONFIGS = [
    dict(mlp="moe", n_experts=4, experts_per_token=2),
    dict(mlp="moe", n_experts=5, experts_per_token=1, n_shared_experts=0, tie_embeddings=True),
    dict(mlp="moe", attention="mla", n_shared_experts=2, expert_hidden=24),
]


@pytest.mark.parametrize("kwargs", COUNT_CONFIGS)
def test_count_parameters_matches_the_model(kwargs):
    c = tiny(**kwargs)
    assert count_parameters(c) == sum(p.numel() for p in GPT(c).parameters())
    assert active_parameters(c) == count_parameters(c)  # dense: every weight is used


@pytest.mark.parametrize("kwargs", MOE_CONFIGS)
def test_count_parameters_matches_the_moe_model(kwargs):
    pytest.importorskip("tinylm.moe")
    c = tiny(**kwargs)
    assert count_parameters(c) == sum(p.numel() for p in GPT(c).parameters())


@pytest.mark.parametrize("kwargs", MOE_CONFIGS)
@torch.no_grad()
def test_active_parameters_are_those_one_token_uses(kwargs):
    pytest.importorskip("tinylm.moe")
    c = tiny(**kwargs)
    model = GPT(c).eval()
    used = set()

    def hook(module, inputs, output):
        if inputs[0].numel():  # a module called with zero tokens does no work
            used.add(module)

    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            m.register_forward_hook(hook)
    model(tokens(1, 1))
    params = {id(p): p for m in used for p in m.parameters(recurse=False)}
    assert sum(p.numel() for p in params.values()) == active_parameters(c)
    for block in model.blocks:
        ran = [e for e in block.mlp.experts if e.gate in used]
        assert len(ran) == c.experts_per_token
        assert int(block.mlp.last_expert_counts.sum()) == c.experts_per_token


def count_flops(fn) -> int:
    # torch 2.x has no FLOP formula for the fused CPU attention kernel (it would count 0);
    # tinylm.profile.flop_counter registers the standard one (its single home).
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kwargs", COUNT_CONFIGS)
@torch.no_grad()
def test_flops_per_token_matches_flop_counter(kwargs):
    c = tiny(**kwargs)
    model, B, T = GPT(c).eval(), 2, 16
    measured = count_flops(lambda: model(tokens(B, T)))
    assert measured / (B * T) == pytest.approx(flops_per_token(c, T), rel=0.02)  # exact today
    if c.attention != "mla":  # one cached decode step at position 9 attends to 10 keys
        cache = model.new_cache(B)
        model(tokens(B, 9), cache=cache)
        measured = count_flops(lambda: model(tokens(B, 1), cache=cache))
        assert measured / B == pytest.approx(flops_per_token(c, 10), rel=0.02)


@pytest.mark.parametrize("kwargs", MOE_CONFIGS)
@torch.no_grad()
def test_moe_flops_per_token_matches_flop_counter(kwargs):
    pytest.importorskip("tinylm.moe")
    c = tiny(**kwargs)
    model, B, T = GPT(c).eval(), 2, 8
    measured = count_flops(lambda: model(tokens(B, T)))
    assert measured / (B * T) == pytest.approx(flops_per_token(c, T), rel=0.05)


@pytest.mark.parametrize("variant", ["mha", "mla"])
@torch.no_grad()
def test_moe_cached_decode_and_aux_loss(variant):
    pytest.importorskip("tinylm.moe")
    model, T = make(variant, mlp="moe", n_experts=4, moe_balance="aux_loss"), 10
    idx, pad_mask = tokens(3, T), left_pad_mask([0, 2, 5], T)
    full = model(idx, pad_mask=pad_mask)
    assert model.aux_loss().shape == ()
    expected = sum(block.mlp.aux_loss for block in model.blocks)
    close(model.aux_loss(), expected)
    close(decode(model, idx, pad_mask, prefill=6)[pad_mask], full[pad_mask])


# ----------------------------------------------------------------------------- ablation switches


def _one_layer(**overrides) -> GPT:
    torch.manual_seed(0)
    base = dict(vocab_size=VOCAB, context_length=16, n_layer=1, n_head=2, n_embd=16)
    return GPT(GPTConfig(**{**base, **overrides})).eval()


@pytest.mark.parametrize("position", ["rope", "none"])
def test_without_rope_one_layer_cannot_tell_the_order_of_earlier_tokens(position):
    # With no positional signal, the last query attends to a *set* of keys: in a one-layer
    # model, shuffling the tokens before it cannot change its logits. RoPE makes order visible.
    model = _one_layer(position=position)
    idx = torch.tensor([[5, 9, 2, 40, 17, 3]])
    shuffled = torch.tensor([[17, 2, 40, 5, 9, 3]])  # same tokens before the last one
    with torch.no_grad():
        same = torch.allclose(model(idx)[0, -1], model(shuffled)[0, -1], atol=1e-5)
    assert same is (position == "none")


def test_post_norm_block_normalises_each_residual_sum():
    model = _one_layer(norm_placement="post")
    block = model.blocks[0]
    x = torch.randn(2, 5, 16)
    cos, sin = model.rope_cos[:5], model.rope_sin[:5]
    mask = model._attention_mask(None, None, 0, 5)
    with torch.no_grad():
        h = block.attn_norm(x + block.attn(x, cos, sin, mask, None))
        want = block.mlp_norm(h + block.mlp(h))
        torch.testing.assert_close(block(x, cos, sin, mask, None), want)
        # and it is not the pre-norm block with the same weights
        pre = x + block.attn(block.attn_norm(x), cos, sin, mask, None)
        pre = pre + block.mlp(block.mlp_norm(pre))
        assert not torch.allclose(want, pre, atol=1e-3)


@pytest.mark.parametrize("switch", [dict(position="none"), dict(norm_placement="post")])
def test_switched_models_decode_with_the_cache_and_round_trip(switch):
    model = _one_layer(**switch)
    idx = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2)
        steps = [model(idx[:, :4], cache=cache)] + [
            model(idx[:, t : t + 1], cache=cache) for t in range(4, 7)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    assert GPTConfig.from_dict(json.loads(json.dumps(model.config.to_dict()))) == model.config


def test_ports_refuse_the_ablation_layouts():
    from tinylm.port.numpy_runtime import NumpyLM

    model = _one_layer(norm_placement="post")
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match="norm_placement='post'"):
        NumpyLM(model.config.to_dict(), weights)
