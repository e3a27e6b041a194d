"""The model library: modules against plain torch references (forward and backward), the
image scatter, loss scaling, freezing, parameter counts and meta/fake construction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmgraph.core.config import load_params
from mmgraph.models import build_model, component_of, random_batch
from mmgraph.models.attention import Attention, apply_rotary, causal_padding_mask, rotary_cos_sin
from mmgraph.models.layers import FeedForwardNetwork, RMSNorm, quick_gelu
from mmgraph.models.loss import lm_loss
from tests.conftest import BIG1, BIG2, TINY1, TINY2


def _grads(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*inputs)
    out.sum().backward() if out.requires_grad else None
    return out.detach(), [x.grad for x in inputs if x.requires_grad]


def ref_attention(x, attn: Attention, mask):
    """Textbook multi-head attention with repeated key/value heads."""
    b, s, h = x.shape
    nh, nkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = (x @ attn.proj_q_dense_layer.weight.T).view(b, s, nh, hd).transpose(1, 2)
    k = (x @ attn.proj_k_dense_layer.weight.T).view(b, s, nkv, hd).transpose(1, 2)
    v = (x @ attn.proj_v_dense_layer.weight.T).view(b, s, nkv, hd).transpose(1, 2)
    k = k.repeat_interleave(nh // nkv, dim=1)
    v = v.repeat_interleave(nh // nkv, dim=1)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1)
    return (p @ v).transpose(1, 2).reshape(b, s, h) @ attn.proj_output_dense_layer.weight.T


def _attn(impl, kv):
    torch.manual_seed(0)
    return Attention(32, 4, kv, use_bias=False, impl=impl)


CASES = {
    # name: (module under test, torch reference, input shapes)
    "rmsnorm": (RMSNorm(16, 1e-6), lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), [(3, 5, 16)]),
    "quick_gelu": (quick_gelu, lambda x: x * torch.sigmoid(1.702 * x), [(4, 8)]),
    "ffn_swiglu": (FeedForwardNetwork(8, [12, 8], ["swiglu", None], False), None, [(2, 3, 8)]),
    "ffn_gelu_mlp2x": (FeedForwardNetwork(8, [16, 16], ["gelu", None], True), None, [(2, 3, 8)]),
}


def _ffn_ref(ffn):
    def ref(x):
        for layer in ffn.ffn:
            y = F.linear(x, layer.linear_layer.weight, layer.linear_layer.bias)
            if layer.glu_act is not None:
                y = F.silu(F.linear(x, layer.linear_layer_for_glu.weight)) * y
            elif layer.act is not None:
                y = F.gelu(y)
            x = y
        return x
    return ref


@pytest.mark.parametrize("name", sorted(CASES))
def test_module_matches_reference_forward_and_backward(name):
    module, ref, shapes = CASES[name]
    ref = ref or _ffn_ref(module)
    torch.manual_seed(1)
    inputs = [torch.randn(s) for s in shapes]
    out, grads = _grads(module, *inputs)
    ref_out, ref_grads = _grads(ref, *inputs)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_attention_matches_textbook(impl, kv):
    attn = _attn(impl, kv)
    pad = torch.zeros(2, 7, dtype=torch.long)
    pad[1, 5:] = 1
    mask = causal_padding_mask(pad, 7, torch.float32, torch.device("cpu"))
    x = torch.randn(2, 7, 32)
    out, (gx,) = _grads(lambda t: attn(t, mask), x)
    ref, (rgx,) = _grads(lambda t: ref_attention(t, attn, mask), x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rgx, rtol=1e-4, atol=1e-5)


def test_rotary_is_a_rotation_of_pairs_and_partial_rotary_passes_the_rest():
    pos = torch.arange(6)[None]
    x = torch.randn(1, 2, 6, 8)
    cos, sin = rotary_cos_sin(pos, 4, 10000.0, torch.float32)
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])
    # Rotation keeps the norm of each (i, i + rd/2) pair; position 0 is unchanged.
    pair = lambda t: t[..., [0, 2]].norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair(y), pair(x))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])


def test_causal_padding_mask_never_masks_a_whole_row():
    pad = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    mask = causal_padding_mask(pad, 4, torch.float32, torch.device("cpu"))
    probs = torch.softmax(torch.zeros(2, 1, 4, 4) + mask, dim=-1)
    assert torch.isfinite(probs).all()
    assert probs[0, 0, 3, 2:].sum() < 1e-6  # padding keys get no weight
    assert probs[0, 0, 0, 1:].sum() < 1e-6  # future keys get no weight


def test_image_features_land_exactly_at_image_data_loc():
    params = load_params(TINY2)
    model, _ = build_model(params, seed=0)
    batch = random_batch(params.layout(), 3, seed=2, num_images=[2, 1, 0])
    with torch.no_grad():
        emb = model.compute_embeddings(batch["image_data"], batch["text_input_ids"], batch["image_data_loc"])
        feats = model.image_model(batch["image_data"])
        text = model.text_model.compute_input_embeddings(batch["text_input_ids"])
    for b, n in enumerate([2, 1, 0]):
        for i in range(n):
            torch.testing.assert_close(emb[b, batch["image_data_loc"][b, i]], feats[b, i])
        is_text = batch["token_modality_idx"][b] == 0
        torch.testing.assert_close(emb[b, is_text], text[b, is_text])
    assert (batch["token_modality_idx"].sum(1) == torch.tensor([32, 16, 0])).all()


def test_loss_scaling_modes():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    ce = F.cross_entropy(logits.reshape(10, 11), labels.reshape(10), reduction="none").view(2, 5)
    total = (ce * mask).sum()
    torch.testing.assert_close(lm_loss(logits, labels, mask, "num_tokens"), total / 5)
    torch.testing.assert_close(lm_loss(logits, labels, mask, "batch_size", 0.5), total / 2 * 0.5)


@pytest.mark.parametrize("path,trainable_prefixes", [
    (TINY1, ("image_model.projection",)),
    (TINY2, ("image_model.projection", "text_model")),
])
def test_freeze_leaves_gradients_only_where_training(path, trainable_prefixes):
    params = load_params(path)
    model, _ = build_model(params, seed=0)
    model(**random_batch(params.layout(), 2, seed=0)).backward()
    for name, p in model.named_parameters():
        trains = name.startswith(trainable_prefixes)
        assert p.requires_grad == trains, name
        assert (p.grad is not None) == trains, name


def test_freeze_pattern_on_module_names_and_parameter_names(tmp_path):
    from mmgraph.models.freeze import match_freeze_patterns
    model, _ = build_model(load_params(TINY2), device="meta")
    report = match_freeze_patterns(model, [r"lm_head$", r"norm1\.weight$"])
    assert report.matches[r"lm_head$"] == ("text_model.lm_head.weight",)
    assert len(report.matches[r"norm1\.weight$"]) == 3 + 2  # 3 ViT blocks, 2 decoder layers


@pytest.mark.parametrize("path,total,trainable", [
    (BIG1, 7_062_902_784, 20_979_712),
    (BIG2, 7_062_902_784, 6_759_395_328),
])
def test_7b_counts_on_meta_device(path, total, trainable):
    model, _ = build_model(load_params(path), device="meta")
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) == total
    assert sum(p.numel() for p in params if p.requires_grad) == trainable
    by = {}
    for name, p in model.named_parameters():
        by[component_of(name)] = by.get(component_of(name), 0) + p.numel()
    assert by == {
        "image_model.image_model_list.0 (encoder)": 303_507_456,
        "image_model.projection (projector)": 20_979_712,
        "text_model (language model)": 6_738_415_616,
    }


def test_tied_embeddings_share_one_tensor(tmp_path):
    params = load_params(TINY1)
    text = params.model.text_model.model_copy(update={"share_embedding_weights": True})
    cfg = params.model.model_copy(update={"text_model": text})
    model, _ = build_model(cfg, device="meta")
    assert model.text_model.lm_head.weight is model.text_model.embedding_layer.word_embeddings.weight


def test_build_under_fake_tensor_mode_allocates_nothing():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    model, _ = build_model(load_params(BIG2), fake_mode=FakeTensorMode())
    assert all(isinstance(p, FakeTensor) for p in model.parameters())


def test_seeded_build_is_reproducible():
    a, _ = build_model(load_params(TINY1), seed=3)
    b, _ = build_model(load_params(TINY1), seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
