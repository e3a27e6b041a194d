"""Parity with Hugging Face: the project's model, loaded with the weights of a tiny random
CLIPVisionModel + LlamaForCausalLM (saved locally), gives the same logits and loss as
transformers' LlavaForConditionalGeneration built from the same weights."""

from __future__ import annotations

import pytest
import torch

from mmgraph.core.config import ModelConfig
from mmgraph.convert.hf_params import llava_model_params
from mmgraph.convert.keys import CLIP_VISION, LLAMA, LLAVA_PROJECTOR
from mmgraph.models import build_model
from tests.hf_tiny import make_hf_llava

PATCHES = 16  # (32 / 8)^2, CLS dropped


def native_state(vision, text, projector):
    out = {}
    for k, v in vision.items():
        if k.endswith("position_ids"):
            continue
        out["image_model.image_model_list.0.0." + CLIP_VISION.to_native(k)] = v
    for k, v in text.items():
        out["text_model." + LLAMA.to_native(k)] = v
    for k, v in projector.items():
        out["image_model.projection." + LLAVA_PROJECTOR.to_native(k)] = v
    return out


def hf_batch(llava, batch=3, seq=40, seed=1):
    """One image per sample at a different offset each; right padding on some samples."""
    g = torch.Generator().manual_seed(seed)
    image_token = llava.config.image_token_id
    vocab = llava.config.text_config.vocab_size
    ids = torch.randint(1, vocab - 1, (batch, seq), generator=g)
    attn = torch.ones(batch, seq, dtype=torch.long)
    loc = torch.zeros(batch, 1, PATCHES, dtype=torch.long)
    for b in range(batch):
        start = 1 + 3 * b
        ids[b, start:start + PATCHES] = image_token
        loc[b, 0] = torch.arange(start, start + PATCHES)
        attn[b, seq - 4 * b:] = 0
    pixels = torch.randn(batch, 3, 32, 32, generator=g)
    return ids, attn, loc, pixels


def our_batch(ids, attn, loc, pixels, image_token):
    labels = torch.zeros_like(ids)
    labels[:, :-1] = ids[:, 1:]
    supervised = (ids != image_token) & (attn == 1)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, :-1] = supervised[:, 1:].long()
    return dict(image_data=pixels[:, None], text_input_ids=ids.masked_fill(ids == image_token, 0),
                image_data_loc=loc, key_padding_mask=1 - attn, labels=labels, loss_mask=loss_mask)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
@pytest.mark.parametrize("layer,kv,tie", [(-2, 2, False), (2, 4, False), (-1, 1, True)])
def test_logits_and_loss_match_transformers_llava(tmp_path, impl, layer, kv, tie):
    llava, vision, text, projector = make_hf_llava(tmp_path, vision_feature_layer=layer,
                                                   num_kv_heads=kv, tie=tie)
    params = llava_model_params(llava.config.vision_config, llava.config.text_config,
                                "mlp2x_gelu", vision_feature_layer=layer)
    model, _ = build_model(ModelConfig.model_validate(params), attention_impl=impl)
    state = native_state(vision, text, projector)
    if tie:
        state.setdefault("text_model.lm_head.weight", state["text_model.embedding_layer.word_embeddings.weight"])
    model.load_state_dict(state, strict=True)
    model.eval()

    ids, attn, loc, pixels = hf_batch(llava)
    hf_labels = ids.masked_fill((ids == llava.config.image_token_id) | (attn == 0), -100)
    with torch.no_grad():
        ref = llava(input_ids=ids, pixel_values=pixels, attention_mask=attn, labels=hf_labels)
        batch = our_batch(ids, attn, loc, pixels, llava.config.image_token_id)
        logits = model.compute_logits(batch["image_data"], batch["text_input_ids"],
                                      batch["image_data_loc"], batch["key_padding_mask"])
        loss = model(**batch)

    real = attn.bool()
    assert ref.logits[real].std() > 0.05, "logits too small to make the comparison meaningful"
    torch.testing.assert_close(logits[real], ref.logits[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-6, atol=1e-6)
