"""Sequence packing: a packed batch gives the loss and every gradient of the same samples run
unpacked (eager and the lowered program), and the packer keeps every token exactly once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from mmgraph.core.config import load_params
from mmgraph.core.ir import InputKind
from mmgraph.models import build_model, pack_batch, pad_batch, random_batch
from mmgraph.models.attention import segment_causal_mask
from mmgraph.models.llama import constant_image_positions
from mmgraph.compiler.pipeline import compile_step
from tests.conftest import TINY1, TINY2

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def packed_params(tmp_path: Path, path: Path, max_num_img: int, **model) -> tuple:
    """``path`` as is (unpacked) and packed (same row length, a bigger image budget per row)."""
    raw = yaml.safe_load(path.read_text())
    raw["model"].update(model)
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(raw))
    for key in ("train_input", "eval_input"):
        raw[key] = dict(raw[key], packed=True, max_num_img=max_num_img)
    packed = tmp_path / "packed.yaml"
    packed.write_text(yaml.safe_dump(raw))
    return load_params(plain), load_params(packed)


def samples_and_rows(plain, packed, n: int, seed: int):
    """``n`` random samples of up to half a row at the unpacked layout (n rows) and the same
    samples packed first-fit in order into rows of the packed layout."""
    layout = plain.layout()
    imax = layout.max_num_img
    num_images = [(i * 7 + seed) % (imax + 1) for i in range(n)]
    short = replace(layout, max_sequence_length=layout.max_sequence_length // 2)
    if short.max_sequence_length - imax * layout.num_patches < 2:
        short = replace(short, max_sequence_length=layout.max_sequence_length)
    samples = pad_batch(random_batch(short, n, seed=seed, num_images=num_images), layout.max_sequence_length)
    rows, row, used_tok, used_img = [], [], 0, 0
    s, budget = packed.layout().max_sequence_length, packed.layout().max_num_img
    for i in range(n):                      # first fit, in order
        tok = int((samples["key_padding_mask"][i] == 0).sum())
        if row and (used_tok + tok > s or used_img + num_images[i] > budget):
            rows.append(row)
            row, used_tok, used_img = [], 0, 0
        row.append(i)
        used_tok += tok
        used_img += num_images[i]
    rows.append(row)
    return samples, pack_batch(samples, rows, packed.layout()), rows


def eager_loss_and_grads(params, batch, seed=0):
    model, _ = build_model(params, seed=seed)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    loss = model(**batch)
    grads = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names], allow_unused=True)
    return loss.detach(), dict(zip(names, grads))


def assert_close(got, want, what, rtol=1e-5):
    if want is None:
        assert got is None or float(got.abs().max()) == 0.0, what
        return
    scale = want.abs().max().clamp(min=1e-12)
    err = float((got - want).abs().max() / scale)
    assert err <= rtol, f"{what}: relative error {err:.2e}"


def test_segment_mask_is_block_diagonal_and_causal():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    allowed = segment_causal_mask(seg, torch.float32)[0, 0] == 0
    want = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                         [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, want)


def test_constant_image_positions_restart_per_sample():
    modality = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0, 0]])
    seg = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2, 0]])
    got = constant_image_positions(modality, seg)
    assert got.tolist() == [[0, 1, 1, 2, 0, 0, 0, 1, 0]]
    # each sample alone gives the same positions
    assert constant_image_positions(modality[:, :4]).tolist() == [[0, 1, 1, 2]]
    assert constant_image_positions(modality[:, 4:8]).tolist() == [[0, 0, 0, 1]]


@pytest.mark.parametrize("scaling", ["num_tokens", "batch_size"])
@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_packed_eager_loss_and_grads_equal_unpacked(tmp_path, scaling, impl, monkeypatch):
    plain, packed = packed_params(tmp_path, TINY2, max_num_img=6, loss_scaling=scaling)
    samples, batch, rows = samples_and_rows(plain, packed, n=7, seed=3)
    assert len(rows) < 7 and max(len(r) for r in rows) >= 2          # really packed
    import mmgraph.models.attention as attention
    init = attention.Attention.__init__
    monkeypatch.setattr(attention.Attention, "__init__",
                        lambda self, *a, **k: init(self, *a, **dict(k, impl=impl)))
    want_loss, want = eager_loss_and_grads(plain, samples)
    got_loss, got = eager_loss_and_grads(packed, batch)
    assert_close(got_loss, want_loss, "loss")
    assert set(got) == set(want) and len(want) > 20
    for name in want:
        assert_close(got[name], want[name], name)


def test_packed_cogvlm_positions_and_experts(tmp_path):
    plain, packed = packed_params(tmp_path, CONFIGS / "params_cogvlm_tiny.yaml", max_num_img=4)
    samples, batch, rows = samples_and_rows(plain, packed, n=5, seed=1)
    assert len(rows) < 5
    want_loss, want = eager_loss_and_grads(plain, samples)
    got_loss, got = eager_loss_and_grads(packed, batch)
    assert_close(got_loss, want_loss, "loss")
    for name in want:
        assert_close(got[name], want[name], name)


@pytest.mark.parametrize("path", [TINY1, TINY2])
def test_packed_program_equals_unpacked_eager(tmp_path, path):
    plain, packed = packed_params(tmp_path, path, max_num_img=6)
    program = compile_step(packed, verify=True)[-1].program
    names = [s.name for s in program.inputs if s.kind == InputKind.BATCH]
    assert names[-2:] == ["segment_ids", "position_ids"]
    n = packed.train_input.micro_batch_size
    samples, batch, rows = None, None, []
    for count in range(n, 6 * n):           # enough samples to fill the program's rows
        samples, batch, rows = samples_and_rows(plain, packed, n=count, seed=5)
        if len(rows) == n:
            break
    assert len(rows) == n and sum(len(r) for r in rows) > n
    model, _ = build_model(packed, seed=0)
    state = dict(model.named_parameters())
    flat = [state[s.name] if s.kind == InputKind.PARAM else batch[s.name] for s in program.inputs]
    with torch.no_grad():
        outs = program.gm(*[t.detach() for t in flat])
    want_loss, want = eager_loss_and_grads(plain, samples)
    assert_close(outs[0], want_loss, "loss")
    grads = [o.target for o in program.outputs if o.kind == "grad"]
    assert grads
    for name, got in zip(grads, outs[len(outs) - len(grads):]):
        assert_close(got, want[name], name)


def test_unpacked_program_has_no_packed_inputs():
    program = compile_step(load_params(TINY1))[-1].program
    names = [s.name for s in program.inputs if s.kind == InputKind.BATCH]
    assert "segment_ids" not in names and "position_ids" not in names


def test_packed_onnx_eval_forward_equals_unpacked(tmp_path):
    from mmgraph.runtime.onnx_program import export_program
    from tests.test_compile import onnx_outputs

    plain, packed = packed_params(tmp_path, TINY2, max_num_img=6)
    program = compile_step(packed, "eval", micro_batch_size=3)[-1].program
    names = export_program(program, tmp_path / "eval.onnx")
    assert "segment_ids" in names and "position_ids" in names
    for count in range(3, 12):
        samples, batch, rows = samples_and_rows(plain, packed, n=count, seed=2)
        if len(rows) == 3:
            break
    assert len(rows) == 3
    loss = onnx_outputs(tmp_path / "eval.onnx", program, packed, batch)[0]
    model, _ = build_model(plain, seed=0)
    model.eval()
    with torch.no_grad():
        want = model(**samples)
    assert_close(torch.from_numpy(loss), want, "loss")
