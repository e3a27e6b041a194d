"""Omitted keys take the Model Zoo's defaults (one test per default that changes the model),
and params that would hang or overflow are refused before anything is built (issue 14)."""

from __future__ import annotations

import pytest
import torch
import yaml

from mmgraph.cli import main
from mmgraph.core.config import load_params
from mmgraph.core.errors import UserError
from mmgraph.models import build_model
from mmgraph.models.vit import ViTModel
from tests.conftest import TINY1


def _raw() -> dict:
    return yaml.safe_load(TINY1.read_text())


def _vit(raw: dict) -> dict:
    return raw["model"]["image_model_list"]["image_models"][0]["image_model"][0]


def _load(tmp_path, raw):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(path)


def _problems(tmp_path, raw) -> list[str]:
    with pytest.raises(UserError) as info:
        _load(tmp_path, raw)
    return [f"{p.where}: {p.message}" for p in info.value.problems]


def test_mixed_precision_defaults_to_true(tmp_path):
    raw = _raw()
    assert _load(tmp_path, raw).model.mixed_precision is False   # the tiny config says so
    del raw["model"]["mixed_precision"]
    assert _load(tmp_path, raw).model.mixed_precision is True


def test_conv_patchified_embedding_defaults_to_linear(tmp_path):
    raw = _raw()
    del _vit(raw)["use_conv_patchified_embedding"]
    cfg = _load(tmp_path, raw).model.image_model_list.image_models[0].encoder
    assert cfg.use_conv_patchified_embedding is False
    linear = ViTModel(cfg).embedding_layer.linear_proj
    c, (ph, pw) = cfg.num_channels, cfg.patch_size
    assert isinstance(linear, torch.nn.Linear) and linear.weight.shape == (cfg.hidden_size, ph * pw * c)


def test_linear_patch_embedding_equals_the_conv_one(tmp_path):
    """Same function as the conv form: weight (h, C, ph, pw) permuted to (h, ph, pw, C)."""
    raw = _raw()
    cfg_conv = _load(tmp_path, raw).model.image_model_list.image_models[0].encoder
    cfg_lin = cfg_conv.model_copy(update={"use_conv_patchified_embedding": False})
    torch.manual_seed(0)
    conv, lin = ViTModel(cfg_conv).embedding_layer, ViTModel(cfg_lin).embedding_layer
    lin.load_state_dict({**conv.state_dict(), "linear_proj.weight":
                         conv.linear_proj.weight.permute(0, 2, 3, 1).reshape(cfg_conv.hidden_size, -1)})
    images = torch.randn(2, *((cfg_conv.num_channels,) + tuple(cfg_conv.image_size)))
    torch.testing.assert_close(lin(images), conv(images))


def test_image_layer_idx_unset_runs_every_block_and_the_final_norm(tmp_path):
    raw = _raw()
    del _vit(raw)["image_layer_idx"]
    cfg = _load(tmp_path, raw).model.image_model_list.image_models[0].encoder
    assert cfg.image_layer_idx is None and cfg.num_layers_used == cfg.num_hidden_layers and cfg.uses_final_norm
    torch.manual_seed(0)
    vit = ViTModel(cfg)
    images = torch.randn(1, cfg.num_channels, *cfg.image_size)
    x = vit.embedding_layer(images)
    for block in vit.encoder.transformer_encoder.layers:
        x = block(x)
    torch.testing.assert_close(vit.extract_features(images), vit.encoder.transformer_encoder.norm(x))
    last = cfg.model_copy(update={"image_layer_idx": -1})
    vit_last = ViTModel(last)
    vit_last.load_state_dict(vit.state_dict())
    torch.testing.assert_close(vit_last.extract_features(images), x)   # -1: no final norm


def test_ffn_use_bias_defaults_to_false(tmp_path):
    raw = _raw()
    del raw["model"]["image_model_list"]["global_image_projection"]["use_bias"]
    model, _ = build_model(_load(tmp_path, raw), device="meta")
    assert model.image_model.projection.ffn[0].linear_layer.bias is None


def test_shuffle_seed_default(tmp_path):
    raw = _raw()
    del raw["train_input"]["shuffle_seed"]
    assert _load(tmp_path, raw).train_input.shuffle_seed == 274508134


def test_loss_weight_default_and_rules(tmp_path):
    raw = _raw()
    del raw["model"]["loss_weight"]
    assert _load(tmp_path, raw).model.loss_weight == 0.0   # unused with num_tokens
    raw["model"]["loss_scaling"] = "batch_size"
    assert any("model.loss_weight: loss_scaling batch_size multiplies" in p for p in _problems(tmp_path, raw))
    raw["model"]["loss_weight"] = 0.5
    assert _load(tmp_path, raw).model.loss_weight == 0.5
    raw["model"]["loss_scaling"] = "num_tokens"
    assert _problems(tmp_path, raw) == [
        "model.loss_weight: loss_scaling num_tokens requires loss_weight 1.0 (got 0.5), as in the Model Zoo"]


def test_batch_not_a_multiple_of_micro_batch(tmp_path):
    raw = _raw()
    raw["train_input"].update(batch_size=8, micro_batch_size=3)
    params = _load(tmp_path, raw)
    assert params.micro_batch_sizes("train") == [3, 3, 2]
    raw["train_input"]["micro_batch_size"] = "auto"
    assert _load(tmp_path, raw).micro_batch_sizes("train") == [8]


# --- issue 14: bad params are a named exit 2, in bounded time, before anything is built ------------

def _check(tmp_path, raw, capsys) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["check", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(path) in err
    return err


def test_non_utf8_params(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(TINY1.read_bytes().replace(b"# ", b"# caf\xe9 ", 1))
    assert main(["check", "--params", str(path)]) == 2
    assert f"{path}: not UTF-8 text (byte 0xe9" in capsys.readouterr().err


@pytest.mark.parametrize("key, value, message", [
    ("num_hidden_layers", True, "model.text_model.num_hidden_layers: must be a number, not a boolean (true)"),
    ("num_hidden_layers", 1_000_000_000, "model.text_model.num_hidden_layers: 1,000,000,000 layers is beyond"),
    ("vocab_size", 10**18, "model: about 1"),
    ("hidden_size", 2**40, "model: about"),
])
def test_absurd_text_model_values(tmp_path, capsys, key, value, message):
    raw = _raw()
    raw["model"]["text_model"][key] = value
    assert message in _check(tmp_path, raw, capsys)


@pytest.mark.parametrize("value, message", [
    (2.5, "train_input.batch_size: must be a valid integer, got a number with a fractional part"),
    (1_000_000_000, "train_input.batch_size: 1,000,000,000 is beyond the supported"),
    (False, "train_input.batch_size: must be a number, not a boolean (false)"),
])
def test_bad_batch_sizes(tmp_path, capsys, value, message):
    raw = _raw()
    raw["train_input"]["batch_size"] = value
    assert message in _check(tmp_path, raw, capsys)


def test_numbers_yaml_reads_as_strings_still_load(tmp_path):
    """PyYAML reads 5e-5 as a string; it must still be the number (only booleans are refused)."""
    path = tmp_path / "p.yaml"
    path.write_text(TINY1.read_text().replace("layer_norm_epsilon: 1.0e-5", "layer_norm_epsilon: 1e-5", 1))
    load_params(path)
