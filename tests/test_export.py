"""The training forward (with loss) traces to one static graph with torch.export, on the meta
device and under FakeTensorMode, with several images per sample at arbitrary positions."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mmgraph.core.config import load_params
from mmgraph.models import build_model, random_batch
from tests.conftest import BIG1, BIG2, TINY1, TINY2


def _export_meta(path, batch_size=2):
    params = load_params(path)
    model, _ = build_model(params, device="meta")
    batch = {k: v.to("meta") for k, v in random_batch(params.layout(), batch_size, seed=0).items()}
    return model, torch.export.export(model, (), batch)


def _export_fake(path, batch_size=2):
    params = load_params(path)
    mode = FakeTensorMode()
    model, _ = build_model(params, fake_mode=mode)
    batch = {k: mode.from_tensor(v) for k, v in random_batch(params.layout(), batch_size, seed=0).items()}
    with mode:
        return model, torch.export.export(model, (), batch)


def _check_signature(model, ep):
    sig = ep.graph_signature
    assert len(sig.parameters) == len(dict(model.named_parameters()))
    assert not sig.buffers and not ep.constants  # weights are inputs, never constants
    (loss,) = [n for n in ep.graph.nodes if n.op == "output"][0].args[0]
    assert tuple(loss.meta["val"].shape) == ()


@pytest.mark.parametrize("path", [TINY1, TINY2])
@pytest.mark.parametrize("how", [_export_meta, _export_fake])
def test_tiny_exports(path, how):
    _check_signature(*how(path))


@pytest.mark.parametrize("path", [BIG1, BIG2])
def test_7b_exports_with_fake_tensors(path):
    _check_signature(*_export_fake(path, batch_size=1))


def test_7b_exports_on_meta_device():
    _check_signature(*_export_meta(BIG1, batch_size=1))


def test_exported_program_is_not_specialized_to_image_positions():
    """Export with one batch, run with others (different image counts and positions): the
    exported program still equals eager, so nothing depends on the values of the inputs."""
    params = load_params(TINY2)
    model, _ = build_model(params, seed=0)
    layout = params.layout()
    ep = torch.export.export(model, (), random_batch(layout, 3, seed=0, num_images=[2, 2, 2]))
    run = ep.module()
    for seed, counts in [(1, [0, 1, 2]), (2, [1, 0, 0]), (3, [2, 1, 1])]:
        batch = random_batch(layout, 3, seed=seed, num_images=counts)
        torch.testing.assert_close(run(**batch), model(**batch), rtol=1e-6, atol=1e-6)
