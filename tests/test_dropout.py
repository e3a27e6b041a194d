"""Dropout as the Model Zoo has it, inside the compiled program (issue 27, item 3): its
defaults, masks from counter-based random numbers that are inputs of the program (seed and
each row's sample index), eager and program alike, statistically sound, and a resumed run
bit-exact."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from mmgraph.core.config import load_params
from mmgraph.core.ir import RNG_FIELDS, InputKind
from mmgraph.models.rng import Dropout, Rng, hash32, hash32_int
from mmgraph.compiler.pipeline import compile_step
from tests.conftest import ROOT, TINY2

MZ = ROOT / "tests" / "data" / "modelzoo"


def _without_dropout_keys(node):
    if isinstance(node, dict):
        return {k: _without_dropout_keys(v) for k, v in node.items()
                if k not in ("dropout_rate", "attention_dropout_rate", "embd_pdrop", "embedding_dropout_rate")}
    if isinstance(node, list):
        return [_without_dropout_keys(v) for v in node]
    return node


@pytest.mark.parametrize("source, vit", [(MZ / "Release_2.3.1" / "params_mm_llava_llama2_7b_phase2.yaml", 0.0),
                                         (MZ / "Release_2.10.0" / "params_mm_llava_llama2_7b_phase2.yaml", 0.1),
                                         (MZ / "Release_2.10.0" / "params_llava_v1p5_pretrain_7b_phase2_MSL2K.yaml",
                                          0.1)])
def test_the_model_zoos_dropout_defaults_apply_when_keys_are_left_out(tmp_path, source, vit):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_without_dropout_keys(yaml.safe_load(source.read_text()))))
    model = load_params(path).model
    text = model.text_model
    assert (text.dropout_rate, text.attention_dropout_rate, text.embd_pdrop) == (0.1, 0.1, 0.1)
    encoder = model.image_model_list.image_models[0].encoder
    assert encoder.dropout_rate == vit                   # 2.3.1: 0.0; 2.10 (trainer layout): 0.1
    assert encoder.attention_dropout_rate == encoder.embedding_dropout_rate == 0.0
    shipped = load_params(source).model.text_model         # the shipped files set 0.0 themselves
    assert shipped.dropout_rate == 0.0


def _dropout_params(tmp_path: Path, rate: float = 0.1) -> Path:
    raw = yaml.safe_load(TINY2.read_text())
    raw["model"]["text_model"].update(dropout_rate=rate, attention_dropout_rate=rate, embd_pdrop=rate)
    vit = raw["model"]["image_model_list"]["image_models"][0]["image_model"][0]
    vit.update(dropout_rate=rate, attention_dropout_rate=rate, embedding_dropout_rate=rate)
    raw["model"]["image_model_list"]["global_image_projection"]["layers_dropout_rates"] = [rate, None]
    path = tmp_path / "dropout.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("remat", ["none", "full"])
def test_the_program_with_dropout_equals_eager_under_the_same_random_inputs(tmp_path, remat):
    """The verifier runs the program and eager autograd on the same seed and sample indices:
    loss and every gradient within 1e-5; with full recomputation the masks are made again in
    the backward (pure values of the inputs) and still agree."""
    params = load_params(_dropout_params(tmp_path))
    stages = compile_step(params, "train", verify=True, remat=remat)
    program = stages[-1].program
    assert [s.name for s in program.inputs if s.kind == InputKind.RNG] == list(RNG_FIELDS)
    ops = {str(n.target) for n in program.gm.graph.nodes if n.op == "call_function"}
    assert not any(r in o for o in ops for r in ("bernoulli", "native_dropout", "aten.rand"))
    if remat == "full":
        assert program.remat.clones                      # masks among what the backward recomputes
    evaluated = compile_step(params, "eval")[-1].program  # no dropout in eval: no random inputs
    assert not any(s.kind == InputKind.RNG for s in evaluated.inputs)


def _rng(rows, seed=5) -> Rng:
    return Rng(torch.tensor(seed), torch.as_tensor(rows, dtype=torch.int64))


def test_hash_matches_its_reference_and_masks_are_statistically_sound():
    xs = torch.randint(0, 2 ** 32, (2000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    assert hash32(xs).tolist() == [hash32_int(int(x)) for x in xs]
    drop = Dropout(0.1)
    rows, width = 64, 4096
    u = _rng(range(rows)).uniform24((rows, width), site=3).double() / 2 ** 24
    n = u.numel()
    # uniform: each of 16 bins holds n/16 within 5 sigma
    counts = torch.histc(u, bins=16, min=0.0, max=1.0)
    sigma = math.sqrt(n / 16 * (1 - 1 / 16))
    assert float((counts - n / 16).abs().max()) < 5 * sigma
    keep = drop.keep_mask((rows, width), _rng(range(rows))).double()
    assert abs(float(keep.mean()) - 0.9) < 5 * math.sqrt(0.09 / n)
    # neighbours, rows, sites and seeds are uncorrelated (|r| < 5 / sqrt(n))
    other_site = Dropout(0.1)
    other_site.site = 4
    pairs = {"next element": (keep[:, :-1], keep[:, 1:]), "next row": (keep[:-1], keep[1:]),
             "another site": (keep, other_site.keep_mask((rows, width), _rng(range(rows))).double()),
             "another seed": (keep, drop.keep_mask((rows, width), _rng(range(rows), seed=6)).double())}
    for what, (a, b) in pairs.items():
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        r = float((a * b).sum() / (a.norm() * b.norm()))
        assert abs(r) < 5 / math.sqrt(a.numel()), (what, r)


def test_a_rows_mask_follows_its_sample_not_its_place_in_the_batch():
    """The same sample gets the same mask alone or among others, at any row: what makes data
    parallel, any micro-batch split and a resume draw the masks of one process."""
    drop = Dropout(0.3)
    whole = drop.keep_mask((6, 5, 7), _rng([10, 11, 12, 13, 14, 15]))
    assert torch.equal(drop.keep_mask((2, 5, 7), _rng([13, 14])), whole[3:5])
    assert torch.equal(drop.keep_mask((1, 5, 7), _rng([10])), whole[:1])
    assert not torch.equal(whole[0], whole[1])
    images = _rng([10, 11]).per_image(3).row_keys()      # image rows: sample b's image i
    assert images.shape == (6,) and len(set(images.tolist())) == 6
    assert torch.equal(_rng([11]).per_image(3).row_keys(), images[3:])
    mask = drop.keep_mask((6, 4), _rng([10, 11]).per_image(3))
    assert torch.equal(drop.keep_mask((3, 4), _rng([11]).per_image(3)), mask[3:])


def test_training_without_random_inputs_is_refused():
    x = torch.ones(2, 3)
    drop = Dropout(0.5)
    with pytest.raises(ValueError, match="random inputs"):
        drop(x, None)
    drop.eval()
    assert torch.equal(drop(x, None), x)


def test_a_resumed_run_with_dropout_is_bit_exact(tmp_path):
    from mmgraph.models import initial_weights, random_batch
    from mmgraph.runtime.runner import Runner

    params = load_params(_dropout_params(tmp_path))
    program = compile_step(params, "train")[-1].program
    size = program.batch_size
    batches = [random_batch(params.layout("train"), size, seed=40 + i) for i in range(4)]

    def train(md, steps, start=0):
        runner = Runner(params, md, program, weights=initial_weights(params))
        if start:
            assert runner.resume() is not None
        for step in range(start, steps):
            runner.train_step([batches[step]])
        runner.save()
        return runner

    straight = train(tmp_path / "a", 4)
    train(tmp_path / "b", 2)
    resumed = train(tmp_path / "b", 4, start=2)
    assert all(torch.equal(straight.weights[k], resumed.weights[k]) for k in straight.weights)
    unchanged = train(tmp_path / "c", 4)                 # and the masks did something: seed matters
    raw = yaml.safe_load(Path(params.path).read_text())
    raw["runconfig"]["seed"] = raw["runconfig"].get("seed", 1) + 1
    (tmp_path / "seed.yaml").write_text(yaml.safe_dump(raw))
    other = load_params(tmp_path / "seed.yaml")
    runner = Runner(other, tmp_path / "d", program, weights=initial_weights(params))
    for b in batches:
        runner.train_step([b])
    assert all(torch.equal(straight.weights[k], unchanged.weights[k]) for k in straight.weights)
    assert any(not torch.equal(straight.weights[k], runner.weights[k]) for k in runner.trainable)


def test_a_program_with_dropout_is_one_op_per_mask_and_round_trips_as_an_artifact(tmp_path):
    """The mask is one op (mmgraph::dropout_keep, pure: it recomputes), which the artifact's
    allowlist takes: the loaded program computes what the compiled one does, bit for bit."""
    from mmgraph.compiler import artifact
    from mmgraph.core.rng import rng_inputs
    from mmgraph.models import initial_weights, random_batch

    params = load_params(_dropout_params(tmp_path))
    program = compile_step(params, "train")[-1].program
    ops = [str(n.target) for n in program.gm.graph.nodes if n.op == "call_function"]
    assert ops.count("mmgraph.dropout_keep.default") >= 8
    assert not any(o.startswith(("aten.bitwise_xor", "aten.__rshift__", "aten.__lshift__")) for o in ops)
    back = artifact.load(artifact.save(tmp_path / "train", program, {"mode": "train"}))
    weights = initial_weights(params)
    batch = random_batch(params.layout("train"), program.batch_size, seed=3) | rng_inputs(9, 100, program.batch_size)
    args = [weights[s.name] if s.kind == InputKind.PARAM else batch[s.name] for s in program.inputs]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(program.gm(*args), back.gm(*args)))


def test_ranks_draw_their_own_random_numbers_and_rank_0_the_runs():
    """A wafer program's dropout draws from torch's generator (legalize): rank 0 keeps the run's
    seed (one process and rank 0 alike), other ranks and resumed steps get seeds of their own."""
    from mmgraph.runtime.runner import rank_seed
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(7, r, s) for r in range(4) for s in (0, 10)}
    assert len(seeds) == 8 and all(0 <= s < 2 ** 63 for s in seeds)
