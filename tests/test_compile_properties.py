"""Property test: on random small configs, every pass keeps the loss and every gradient equal
to eager PyTorch autograd (verify=True raises otherwise)."""

from __future__ import annotations

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mmgraph.core.config import load_params
from mmgraph.core.target import load_target
from mmgraph.compiler.pipeline import compile_step
from tests.conftest import FUZZ, TINY1

FREEZES = [[], ["^image_model.image_model_list"], ["^image_model.image_model_list", "^text_model"],
           ["^text_model.transformer_decoder.layers.0", "^image_model.projection.ffn.0"]]


@settings(FUZZ, max_examples=6)
@given(
    vit_layers=st.integers(1, 3), layer_idx=st.integers(-1, 0), select=st.sampled_from(["patch", "cls_patch"]),
    heads=st.sampled_from([(4, 4), (4, 2), (4, 1), (2, 2)]), llm_layers=st.integers(1, 2),
    glu=st.sampled_from(["swiglu", "gelu"]), images=st.integers(1, 2), tied=st.booleans(),
    scaling=st.sampled_from(["num_tokens", "batch_size"]), freeze=st.sampled_from(FREEZES),
)
def test_passes_keep_semantics_on_random_configs(tmp_path_factory, vit_layers, layer_idx, select, heads,
                                                 llm_layers, glu, images, tied, scaling, freeze):
    raw = yaml.safe_load(TINY1.read_text())
    vit = raw["model"]["image_model_list"]["image_models"][0]["image_model"][0]
    vit.update(num_hidden_layers=vit_layers, image_layer_idx=layer_idx)
    raw["model"]["image_model_list"]["image_feature_select_mode"] = select
    text = raw["model"]["text_model"]
    text.update(num_heads=heads[0], num_hidden_layers=llm_layers, nonlinearity=glu,
                share_embedding_weights=tied, rotary_dim=64 // heads[0])
    text["extra_attention_params"] = {"num_kv_groups": heads[1]}
    raw["model"].update(loss_scaling=scaling, freeze=freeze)
    for section in ("train_input", "eval_input"):
        raw[section].update(max_num_img=images, batch_size=2, micro_batch_size=2)
    path = tmp_path_factory.mktemp("p") / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    stages = compile_step(load_params(path), "train", verify=True, target=load_target("cs2"))
    assert [s.name for s in stages][3:7] == ["legalize", "fusion", "remat", "fuse_recomputed"]     # every pass checked
