"""Params loading: the shipped configs, aliases, derived values, cross-key rules."""

from __future__ import annotations

import pytest
import yaml

from mmgraph.core.config import load_params, num_image_tokens
from mmgraph.core.errors import UserError
from tests.conftest import BIG1, BIG2, TINY1, TINY2


def write(tmp_path, raw) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def raw(path=TINY1) -> dict:
    return yaml.safe_load(path.read_text())


def problems(path, mode="train") -> list[str]:
    with pytest.raises(UserError) as info:
        load_params(path, mode)
    return [f"{p.where}: {p.message}" for p in info.value.problems]


@pytest.mark.parametrize("path", [TINY1, TINY2, BIG1, BIG2])
@pytest.mark.parametrize("mode", ["train", "eval", "train_and_eval"])
def test_shipped_configs_load(path, mode):
    load_params(path, mode)


def test_7b_derived_layout():
    layout = load_params(BIG1).layout()
    assert (layout.num_patches, layout.max_sequence_length, layout.max_num_img) == (576, 2048, 1)
    assert layout.image_data_size == (3, 336, 336) and layout.vocab_size == 32000


def test_schedulers_in_model_zoo_spellings(tmp_path):
    r = raw()
    r["optimizer"]["learning_rate"] = [
        {"scheduler": "LinearLR", "initial_learning_rate": 0.0, "end_learning_rate": 1e-3, "total_iters": 5},
        {"scheduler": "cosinedecaylr", "initial_learning_rate": 1e-3, "end_learning_rate": 0.0, "total_iters": 5},
        {"scheduler": "constant", "learning_rate": 1e-4},
    ]
    names = [s.scheduler for s in load_params(write(tmp_path, r)).optimizer.learning_rate]
    assert names == ["Linear", "CosineDecay", "Constant"]


def test_scheduler_missing_keys(tmp_path):
    r = raw()
    r["optimizer"]["learning_rate"] = [{"scheduler": "Linear", "initial_learning_rate": 0.0},
                                       {"scheduler": "Constant"}]
    assert problems(write(tmp_path, r)) == [
        "optimizer.learning_rate[0].end_learning_rate: required by scheduler Linear",
        "optimizer.learning_rate[0].total_iters: required for every scheduler but the last of a sequence",
        "optimizer.learning_rate[1].learning_rate: required by scheduler Constant",
    ]


def test_learning_rate_number_and_bad_scheduler(tmp_path):
    r = raw()
    r["optimizer"]["learning_rate"] = 0.001
    assert load_params(write(tmp_path, r)).optimizer.learning_rate == 0.001
    r["optimizer"]["learning_rate"] = {"scheduler": "Linear", "initial_learning_rate": 0.0,
                                       "end_learning_rate": 1.0, "total_iters": 2, "decay_rat": 1}
    assert problems(write(tmp_path, r)) == [
        "optimizer.learning_rate.decay_rat: unknown key (did you mean 'decay_rate'?)"]


def test_image_size_is_an_alias_of_image_data_size(tmp_path):
    r = raw()
    del r["train_input"]["image_data_size"]
    r["train_input"]["image_size"] = 32
    assert load_params(write(tmp_path, r)).train_input.image_data_size == (3, 32, 32)


def test_image_data_size_must_match_the_encoder(tmp_path):
    r = raw()
    r["train_input"]["image_data_size"] = [3, 64, 64]
    assert problems(write(tmp_path, r)) == [
        "train_input.image_data_size: [3, 64, 64] does not match image_models[0] "
        "(num_channels, image_size) = [3, 32, 32]"]


def test_mode_decides_required_sections(tmp_path):
    r = raw()
    del r["eval_input"]
    path = write(tmp_path, r)
    load_params(path, "train")
    assert problems(path, "eval") == ["eval_input: missing section (required for --mode eval)"]


def test_cerebras_only_keys_are_accepted(tmp_path):
    r = raw()
    r["model"].update(fp16_type="cbfloat16", mixed_precision=True, boundary_casting=False)
    r["runconfig"].update(num_csx=4, precision_opt_level=1, compile_dir="/tmp/x")
    r["model"]["text_model"]["attention_softmax_fp32"] = True
    load_params(write(tmp_path, r))


def test_tokens_per_image_follow_select_mode_and_encoders(tmp_path):
    r = raw()
    base = num_image_tokens(load_params(write(tmp_path, r)).model)
    assert base == 16  # (32/8)^2 patches, CLS dropped
    r["model"]["image_model_list"]["image_feature_select_mode"] = "cls_patch"
    assert num_image_tokens(load_params(write(tmp_path, r)).model) == 17
    second = dict(r["model"]["image_model_list"]["image_models"][0]["image_model"][0], patch_size=[16, 16])
    r["model"]["image_model_list"]["image_models"].append({"image_model": [second]})
    assert num_image_tokens(load_params(write(tmp_path, r)).model) == 17 + 5


def test_images_must_fit_in_the_sequence(tmp_path):
    r = raw()
    r["train_input"]["max_num_img"] = 7
    assert problems(write(tmp_path, r)) == [
        "train_input.max_num_img: 7 images of 16 tokens do not fit in max_sequence_length 96"]


def test_text_model_shape_rules(tmp_path):
    r = raw()
    r["model"]["text_model"].update(num_heads=5, rotary_dim=15)
    r["model"]["text_model"]["extra_attention_params"] = {"num_kv_groups": 3}
    assert problems(write(tmp_path, r)) == [
        "model.text_model.num_heads: hidden_size 64 is not divisible by num_heads 5"]
    r["model"]["text_model"]["num_heads"] = 4
    assert problems(write(tmp_path, r)) == [
        "model.text_model.rotary_dim: 15 must be even and at most the head size 16",
        "model.text_model.extra_attention_params.num_kv_groups: num_heads 4 is not a multiple of num_kv_groups 3",
    ]


def test_invalid_freeze_regex(tmp_path):
    r = raw()
    r["model"]["freeze"] = ["^text_model(", "^image_model"]
    (msg,) = problems(write(tmp_path, r))
    assert msg.startswith("model.freeze[0]: invalid regular expression '^text_model(':")


def test_projector_initializers(tmp_path):
    from mmgraph.models import build_model

    r = raw()
    proj = r["model"]["image_model_list"]["global_image_projection"]
    proj.update(kernel_initializer={"name": "normal", "std": 0.3}, bias_initializer={"name": "constant", "value": 0.5})
    model, _ = build_model(load_params(write(tmp_path, r)), seed=0)
    layer = model.image_model.projection.ffn[0].linear_layer
    assert abs(layer.weight.std().item() - 0.3) < 0.03 and (layer.bias == 0.5).all()
    proj["kernel_initializer"] = "he_normal"
    assert problems(write(tmp_path, r)) == [
        "model.image_model_list.global_image_projection.kernel_initializer: unknown initializer "
        "'he_normal'; supported: normal, truncated_normal, xavier_uniform, xavier_normal, kaiming_uniform, zeros, "
            "constant"]
