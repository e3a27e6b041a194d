"""The model family beyond LLaVA: CogVLM visual experts, MM1 connectors, several encoders. Each
compiles (verified against eager after every pass), trains through the runtime like eager
PyTorch, and agrees with preprocessing on the image-token count."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from mmgraph.models import initial_weights
from mmgraph.cli import main
from mmgraph.core.config import load_params
from mmgraph.models import build_model, random_batch
from mmgraph.compiler.pipeline import compile_step
from mmgraph.runtime.runner import Runner
from tests.conftest import CONFIGS, TINY2
from tests.test_runtime import batches, eager_losses

VARIANTS = ["params_cogvlm_tiny.yaml", "params_mm1_tiny.yaml", "params_two_encoders_tiny.yaml"]


def variant(tmp_path, config, connector=None):
    """A tiny variant; with ``connector``, the MM1 config with that connector instead."""
    raw = yaml.safe_load((CONFIGS / config).read_text())
    if connector:
        raw["model"]["image_model_list"]["connector"] = connector
    path = tmp_path / config
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_compiles_verified_and_trains_like_eager(tmp_path, name):
    params = load_params(CONFIGS / name)
    program = compile_step(params, verify=True)[-1].program         # numerics checked after every pass
    runner = Runner(params, tmp_path, train=program, weights=initial_weights(params))
    initial = {k: v.clone() for k, v in runner.weights.items()}
    steps = 6
    ours = [runner.train_step(batches(params, step)).loss for step in range(steps)]
    ref, _ = eager_losses(params, steps)
    for a, b in zip(ours, ref):
        assert abs(a - b) <= 1e-5 * abs(b), (ours, ref)
    for spec in program.inputs:
        if spec.kind.value == "param" and not spec.trainable:
            assert torch.equal(runner.weights[spec.name], initial[spec.name])


def test_cogvlm_with_frozen_text_weights_grads_only_experts_and_projector():
    params = load_params(CONFIGS / "params_cogvlm_tiny.yaml")
    program = compile_step(params)[-1].program
    grads = [o.target for o in program.outputs if o.kind == "grad"]
    assert grads and all(".visual_expert." in g or g.startswith("image_model.projection.") for g in grads)
    layers = params.model.text_model.num_hidden_layers
    assert sum(".visual_expert." in g for g in grads) == layers * 7    # q, k, v, output + gate, up, down


def test_visual_experts_equal_to_the_text_weights_change_nothing():
    """With the expert weights copied from the text weights, the model is the base model."""
    params = load_params(CONFIGS / "params_cogvlm_tiny.yaml")
    base_raw = yaml.safe_load((CONFIGS / "params_cogvlm_tiny.yaml").read_text())
    text = base_raw["model"]["text_model"]
    text["extra_ffn_params"]["static_dual_expert"] = False
    text["extra_attention_params"]["static_dual_expert"] = False
    from mmgraph.core.config import ModelConfig
    base, _ = build_model(ModelConfig.model_validate(base_raw["model"]), seed=1)
    cog, _ = build_model(params, seed=1)
    state = base.state_dict()
    for k in cog.state_dict():
        if ".visual_expert." in k:
            state[k] = state[k.replace("visual_expert.", "self_attn.") if "proj_" in k else k.replace("visual_expert.", "")]
    cog.load_state_dict(state)
    batch = random_batch(params.layout(), 4, seed=2)
    with torch.no_grad():
        assert torch.equal(cog(**batch), base(**batch))


def test_constant_image_position_gives_each_image_one_position():
    from mmgraph.models.llama import constant_image_positions
    m = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1, 0]])
    assert constant_image_positions(m).tolist() == [[0, 1, 1, 1, 2, 3, 4, 4, 5]]


@pytest.mark.parametrize("connector", [{"name": "avg_pool", "num_tokens": 4},
                                       {"name": "attention_pool", "num_tokens": 3, "num_heads": 2},
                                       {"name": "c_abstractor", "num_tokens": 9, "num_blocks": 2}])
def test_connectors_set_the_image_token_count_preprocessing_uses(tmp_path, connector):
    params = variant(tmp_path, "params_mm1_tiny.yaml", connector)
    assert params.layout().num_patches == connector["num_tokens"]
    model, _ = build_model(params, seed=0)
    feats = model.image_model(torch.randn(2, 1, 3, 32, 32))
    assert feats.shape == (2, 1, connector["num_tokens"], params.model.text_model.hidden_size)
    compile_step(params, verify=True)


def test_bad_connector_settings_are_named(tmp_path, capsys):
    raw = yaml.safe_load((CONFIGS / "params_mm1_tiny.yaml").read_text())
    raw["model"]["image_model_list"]["connector"] = {"name": "avg_pool", "num_tokens": 5}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["check", "--params", str(path)]) == 2
    assert "model.image_model_list.connector.num_tokens: avg_pool pools a square grid: 5 is not a square" in \
        capsys.readouterr().err


def test_cogvlm_generation_cache_equals_recomputing(tmp_path):
    from mmgraph.commands.generate import Generator
    from mmgraph.data.synth import synth
    synth(tmp_path, num_train=2, num_eval=2, seed=1)
    params = load_params(CONFIGS / "params_cogvlm_tiny.yaml")
    gen = Generator(params, None, str(tmp_path / "tokenizer"), seed=4)
    images = [str(p) for p in sorted((tmp_path / "images").glob("*.png"))[:2]]
    for prompt, imgs in (("what colour is the shape ?", images[:1]), ("<image> <image> same shape ?", images)):
        assert gen.generate(prompt, imgs, 10) == gen.generate(prompt, imgs, 10, use_cache=False)


def test_cogvlm_7b_compiles_with_experts_streamed(tmp_path):
    assert main(["compile", "--params", str(CONFIGS / "params_cogvlm_7b.yaml"), "--model_dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "compile" / "report.json").read_text())
    segs = [s for s in report["target"]["segments"] if s["layers"] == ["text_model.layers.5"]]
    # each layer streams its text weights (202,383,360) and the expert's (the same less the two
    # RMSNorms of 4096), in bf16
    assert segs[0]["weight_bytes"] == (202_383_360 + 202_383_360 - 2 * 4096) * 2
    assert report["passes"][-1]["gradients"] == 32 * 7 + 4


def test_tiny2_is_still_the_plain_llava():
    assert load_params(TINY2).model.image_model_list.connector is None
