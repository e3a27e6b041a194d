"""The compiler: passes keep semantics (loss and every gradient equal eager autograd after each
pass), freeze masks remove exactly the frozen work, dumps are written and the printout runs."""

from __future__ import annotations

import json

import pytest
import torch

from mmgraph.cli import main
from mmgraph.core.config import load_params
from mmgraph.report.dump import kernels_per_layer, load_program, write_dumps
from mmgraph.report.formats import parse_mlir, to_mlir
from mmgraph.core.ir import LayerKind, Phase
from mmgraph.core.opcost import node_flops
from mmgraph.core.target import load_target
from mmgraph.compiler.pipeline import reference_inputs, verify_against_eager
from mmgraph.compiler.pipeline import compile_step
from tests.conftest import BIG1, BIG2, TINY1, TINY2

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.convolution_backward.default}


@pytest.mark.parametrize("path", [TINY1, TINY2])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_pass_keeps_loss_and_gradients(path, mode):
    # verify=True checks structure and numerics (rtol 1e-5) after every pass; it raises on a miss.
    # with a target every pass runs: numerics after legalize and remat too
    stages = compile_step(load_params(path), mode, verify=True, target=load_target("cs2"))
    assert [s.name for s in stages] == ["trace", "freeze_masks", "cleanup", "legalize", "fusion", "remat",
                                        "fuse_recomputed", "weight_streaming", "cost"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_numerics_hold_for_other_weights_and_batches(seed):
    params = load_params(TINY2)
    final = compile_step(params)[-1].program
    report = verify_against_eager(final, params, "fusion", seed=seed)
    assert report.grads_checked == 25


def test_phase1_trains_only_the_projector():
    final = compile_step(load_params(TINY1))[-1].program
    grads = [o.target for o in final.outputs if o.kind == "grad"]
    assert grads == ["image_model.projection.ffn.0.linear_layer.weight", "image_model.projection.ffn.0.linear_layer.bias",
                     "image_model.projection.ffn.1.linear_layer.weight", "image_model.projection.ffn.1.linear_layer.bias"]
    backward_layers = {final.info[n.name].layer for n in final.ops() if final.info[n.name].phase == Phase.BACKWARD}
    assert not any(layer.startswith("image_model.encoder") for layer in backward_layers)


def test_phase1_backward_matmul_flops_equal_the_analytic_count():
    """No weight-gradient matmuls for frozen weights and no vision backward: what remains is the
    LLM's input-gradient matmuls, attention backward, and the projector's gradients."""
    params = load_params(TINY1)
    final = compile_step(params)[-1].program
    measured = sum(node_flops(n) for n in final.ops()
                   if final.info[n.name].phase == Phase.BACKWARD and
                   (n.target in MATMULS or "scaled_dot_product" in str(n.target)))
    text, layout = params.model.text_model, params.layout()
    b = params.train_input.micro_batch_size
    tokens, seq = b * layout.max_sequence_length, layout.max_sequence_length
    h, f, v, kv = text.hidden_size, text.filter_size, text.vocab_size, text.num_kv_heads * text.head_dim
    per_layer = 2 * tokens * (h * h + 2 * h * kv + h * h + 2 * h * f + f * h)   # dX of q, k, v, o, gate, up, down
    attention = 8 * b * text.num_heads * seq * seq * text.head_dim              # SDPA backward
    head = 2 * tokens * h * v                                                   # dX of lm_head
    image_tokens = b * layout.max_num_img * layout.num_patches
    projector = 2 * image_tokens * (32 * 64 + 64 * 64 + 64 * 64)                # dW0, dW1, dX1 (dX0 is dead)
    assert measured == text.num_hidden_layers * (per_layer + attention) + head + projector


def test_freeze_masks_reports_flops_before_and_after():
    """Against the model, not the pass: the gradients dropped are the frozen parameters the step
    reads; the backward FLOPs saved include at least every frozen LLM weight's gradient matmul
    (2 x tokens x in x out each), and what is left is the analytic count above plus
    elementwise work."""
    from mmgraph.models import build_model
    from mmgraph.models.anatomy import unused_parameters

    params = load_params(TINY1)
    stages = compile_step(params)
    notes = stages[1].program.history[-1].notes
    model, _ = build_model(params, device="meta")
    unused = unused_parameters(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and n not in unused]
    assert notes["gradients_dropped"] == len(frozen) == 58
    text, layout = params.model.text_model, params.layout()
    tokens = params.train_input.micro_batch_size * layout.max_sequence_length
    h, f, v, kv = text.hidden_size, text.filter_size, text.vocab_size, text.num_kv_heads * text.head_dim
    llm_dw = text.num_hidden_layers * 2 * tokens * (h * h + 2 * h * kv + h * h + 3 * h * f) + 2 * tokens * h * v
    saved = notes["backward_flops_before"] - notes["backward_flops_after"]
    assert saved >= llm_dw > 0
    assert notes["backward_flops_after"] == stages[1].program.flops(Phase.BACKWARD)


def test_the_tracer_records_each_layers_kind_from_the_anatomy():
    """Passes read NodeInfo.kind (remat: the blocks it decides per layer), never layer names."""
    program = compile_step(load_params(TINY2), remat="none")[-1].program
    kinds: dict = {}
    for node in program.ops():
        kinds.setdefault(program.info[node.name].layer, set()).add(program.info[node.name].kind)
    assert all(len(k) == 1 for k in kinds.values()), kinds          # one kind per layer
    kind = {layer: next(iter(k)) for layer, k in kinds.items()}
    blocks = sorted(layer for layer, k in kind.items() if k == LayerKind.BLOCK)
    assert blocks == ["image_model.encoder0.layers.0", "image_model.encoder0.layers.1",   # block 2 is past
                      "text_model.layers.0", "text_model.layers.1"]                      # image_layer_idx
    assert kind["image_model.projection"] == LayerKind.PROJECTION and kind["text_model.head"] == LayerKind.HEAD
    assert kind["loss"] == LayerKind.LOSS and kind["text_model.embeddings"] == LayerKind.EMBEDDINGS


def test_each_transformer_layer_lowers_to_the_same_ops():
    final = compile_step(load_params(TINY2))[-1].program
    def ops_of(layer):
        return [str(n.target) for n in final.ops() if final.info[n.name].layer == layer
                and final.info[n.name].phase == Phase.FORWARD]
    assert ops_of("text_model.layers.0") == ops_of("text_model.layers.1") != []


def test_dumps_and_runnable_printout(tmp_path):
    params = load_params(TINY2)
    stages = compile_step(params)
    where = write_dumps(stages, tmp_path, str(TINY2), params)
    assert sorted(p.name for p in where.iterdir()) == [
        "00-trace.txt", "01-freeze_masks.txt", "02-cleanup.txt", "03-fusion.txt", "eval.onnx",
        "kernels.dot", "kernels.svg", "program.mlir", "program.py", "report.json"]  # no target: no schedule
    text = (where / "02-cleanup.txt").read_text()
    assert "# input trainable text_model.lm_head.weight" in text and "return %" in text
    report = json.loads((where / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["trace", "freeze_masks", "cleanup", "fusion"]
    assert "kernel k0 " in (where / "03-fusion.txt").read_text()
    assert report["parameters"]["trainable"] + report["parameters"]["frozen"] == report["parameters"]["total"]
    step = load_program(where / "program.py")
    _, _, flat = reference_inputs(stages[-1].program, params)
    with torch.no_grad():
        got = step(*[t.detach() for t in flat])
        want = stages[-1].program.gm(*[t.detach() for t in flat])
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_two_compiles_give_identical_dumps(tmp_path):
    for d in ("a", "b"):
        write_dumps(compile_step(load_params(TINY1)), tmp_path / d, "p")
    for name in ("00-trace.txt", "02-cleanup.txt", "03-fusion.txt", "program.py"):
        assert (tmp_path / "a/compile" / name).read_text() == (tmp_path / "b/compile" / name).read_text()


@pytest.mark.parametrize("path,grads,target", [(BIG1, 4, "cs3"), (BIG2, 295, "cs2")])
def test_7b_compiles_and_writes_dumps(tmp_path, capsys, path, grads, target):
    assert main(["compile", "--params", str(path), "--model_dir", str(tmp_path), "--target", target]) == 0
    report = json.loads((tmp_path / "compile" / "report.json").read_text())
    assert report["passes"][-1]["gradients"] == grads
    assert report["artifacts"]["eval.onnx"].startswith("not written: the ONNX exporter runs the program on zero tensors")
    assert all(report["artifacts"][f] == "written" for f in ("program.mlir", "kernels.svg", "kernels.dot"))
    # Layers 1-31 of one recompute policy lower to the same kernels (layer 0 also casts what all
    # share). Legalized for the wafer, attention keeps its probabilities for the backward (as cstorch's
    # bmm/softmax attention does): remat auto recomputes them in some layers, selective ones.
    policy = {x["layer"]: x["policy"] for x in report["remat"]["layers"]}
    layers = {(policy[k], str(v)) for k, v in report["kernels_per_layer"].items()
              if k.startswith("text_model.layers") and k != "text_model.layers.0"}
    assert len(layers) == len({p for p, _ in layers})
    sim = report["target"]
    assert sim["name"] == target and sim["fits"] and sim["step_s"] > 0 and sim["precision"] == "bf16"
    llm = [s for s in sim["segments"] if s["layers"] == ["text_model.layers.7"]]
    assert [s["phase"] for s in llm] == ["forward", "backward"]  # one segment per layer and phase
    assert llm[0]["weight_bytes"] == 202_383_360 * 2              # a LLaMA-7B layer in bf16
    assert (llm[1]["grad_bytes"] > 0) == (path == BIG2)            # phase 1: LLM gradients never stream
    assert (tmp_path / "compile" / "report.html").read_text().startswith("<!doctype html>")
    assert report["parameters"]["total"] == 7_062_902_784
    assert "dumps in" in capsys.readouterr().out


def test_validate_only_writes_nothing(tmp_path, capsys):
    assert main(["compile", "--params", str(TINY1), "--model_dir", str(tmp_path / "m"), "--validate_only"]) == 0
    assert not (tmp_path / "m").exists()
    assert "valid; train step traced to" in capsys.readouterr().out


def test_compile_bad_params_exit_2(tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text("model: {}\n")
    assert main(["compile", "--params", str(bad), "--model_dir", str(tmp_path)]) == 2
    assert "model.image_model_list: required key is missing" in capsys.readouterr().err
    assert not (tmp_path / "compile").exists()


def test_each_transformer_layer_lowers_to_a_small_stable_set_of_kernels():
    final = compile_step(load_params(TINY2), verify=True)[-1].program
    per_layer = kernels_per_layer(final)
    llm = [per_layer[f"text_model.layers.{i}"] for i in range(2)]
    vit = [per_layer[f"image_model.encoder0.layers.{i}"] for i in range(2)]
    assert llm[0] == llm[1] and vit[0] == vit[1]
    # norm, q (+rotary), k (+rotary, GQA expand), v (+expand), attention, o (+residual), norm,
    # gate (+silu, *up), up, down (+residual)
    assert llm[0] == {"forward": 10, "backward": 27}
    kinds = [k.kind for k in final.kernels if k.layer == "text_model.layers.0" and k.phase == "forward"]
    assert kinds.count("attention") == 1 and kinds.count("reduction") == 2 and kinds.count("matmul") == 7


def test_rmsnorm_and_softmax_are_one_kernel_and_refusals_have_reasons():
    final = compile_step(load_params(TINY2))[-1].program
    by_name = {n.name: n for n in final.ops()}
    norms = [k for k in final.kernels if k.kind == "reduction" and k.layer == "text_model.layers.0"
             and k.phase == "forward"]
    for k in norms:  # pow, mean, add eps, rsqrt, mul, mul weight: all in one kernel
        targets = {str(by_name[n].target) for n in k.nodes}
        assert {"aten.pow.Tensor_Scalar", "aten.mean.dim", "aten.rsqrt.default"} <= targets
    assert final.refusals and all(reason for _, _, reason in final.refusals)
    reasons = {r.split(" (")[0] for _, _, r in final.refusals}
    assert "crosses the forward/backward boundary" in reasons
    assert "a matmul starts its own kernel" in reasons


def test_mlir_has_parameters_as_arguments_and_parses_back(tmp_path):
    params = load_params(TINY1)
    final = compile_step(params)[-1].program
    text = to_mlir(final)
    module = parse_mlir(text)
    func = module.body.operations[0]
    assert len(func.regions[0].blocks[0].arguments) == len(final.inputs)
    assert "torch.vtensor.literal" not in text and "dense_resource" not in text  # no embedded weights
    assert "// %arg0: param image_model.image_model_list.0.0.embedding_layer.cls_embedding" in text


def onnx_outputs(path, program, params, batch) -> list:
    """Run an eval.onnx in onnxruntime, its weights fed from the seeded model by the program's
    input names (the graph holds none)."""
    import onnxruntime as ort
    from mmgraph.models import build_model

    model, _ = build_model(params, seed=0)
    state = {k: v.detach().numpy() for k, v in model.named_parameters()}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: (state[i.name] if i.name in state else batch[i.name].numpy())
                              for i in session.get_inputs()})


def test_the_dumps_eval_onnx_is_the_programs_export_and_runs_like_pytorch(tmp_path):
    """compile's eval.onnx: the eval Program exported by the runtime's exporter (no nn.Module is
    exported), weights as inputs, equal to eager PyTorch's loss and logits in onnxruntime."""
    from mmgraph.models import build_model, random_batch
    from mmgraph.report.formats import eval_program

    params = load_params(TINY2)
    stages = compile_step(params)                              # a train compile: the eval step is traced
    where = write_dumps(stages, tmp_path, str(TINY2), params)
    program = eval_program(params, stages[-1].program)
    assert program.mode == "eval" and program.outputs[0].kind == "loss"
    import onnx
    names = [i.name for i in onnx.load(str(where / "eval.onnx")).graph.input]
    assert "text_model.lm_head.weight" in names and not onnx.load(str(where / "eval.onnx")).graph.initializer
    batch = random_batch(params.layout("eval"), program.batch_size, seed=7,
                         num_images=[2, 0, 1, 1, 2, 0, 2, 1][:program.batch_size])
    loss, logits = onnx_outputs(where / "eval.onnx", program, params, batch)[:2]
    model, _ = build_model(params, seed=0)
    model.eval()
    with torch.no_grad():
        ref_logits = model.compute_logits(batch["image_data"], batch["text_input_ids"],
                                          batch["image_data_loc"], batch["key_padding_mask"])
        ref_loss = model(**batch)
    torch.testing.assert_close(torch.from_numpy(loss), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(logits), ref_logits, rtol=1e-5, atol=1e-5)


def test_kernel_drawings(tmp_path):
    from mmgraph.report.draw import COLLAPSE_ABOVE, kernel_graph, to_dot, to_svg

    final = compile_step(load_params(TINY1))[-1].program
    graph = kernel_graph(final)
    assert graph.number_of_nodes() == len(final.kernels) <= COLLAPSE_ABOVE
    assert to_dot(graph).startswith('digraph "kernels"') and to_svg(graph).startswith("<svg")


def test_untraceable_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import mmgraph.models.layers as layers

    original = layers.RMSNorm.forward

    def data_dependent(self, x):
        if x.sum() > 0:  # a Python branch on a tensor value: not a static graph
            return original(self, x)
        return x

    monkeypatch.setattr(layers.RMSNorm, "forward", data_dependent)
    assert main(["compile", "--params", str(TINY2), "--model_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"mmgraph: error: {TINY2}: cannot trace the model: Could not guard on data-dependent")
    assert "(at models/" in err and "Traceback" not in err
    assert not (tmp_path / "compile").exists()


def test_unsupported_op_names_op_and_module(tmp_path, capsys, monkeypatch):
    from mmgraph.core import ops

    monkeypatch.delitem(ops.REGISTRY, "silu")             # an op nobody registered
    assert main(["compile", "--params", str(TINY2), "--model_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert f"mmgraph: error: {TINY2}: op torch.aten.silu (node %silu and 1 more) in layer text_model.layers.0, " \
           "module text_model.transformer_decoder.layers.0.ffn.ffn.0 does not lower on cs2: not in the op registry " \
           "(mmgraph/core/ops.py)" in err


def test_passes_run_under_their_contracts():
    """The pipeline refuses a pass whose required annotations are missing, checks what it
    provides, and clears what it invalidates (legalize after fusion: the kernels are stale)."""
    from dataclasses import replace

    from mmgraph.core.ir import Contract
    from mmgraph.passes.cost import make_cost
    from mmgraph.passes.legalize import make_legalize
    from mmgraph.compiler.pipeline import CONTRACTS, run_pass

    params = load_params(TINY2)
    target = load_target("cs2")
    fused = compile_step(params)[-1].program
    assert fused.kernels is not None and fused.segments is None
    with pytest.raises(ValueError, match="pass cost requires segments"):
        run_pass("cost", make_cost(target, params.precision, 8, 96, 1.0), fused)
    with pytest.raises(ValueError, match="pass noop did not provide kernels"):
        run_pass("noop", lambda p: (replace(p, kernels=None), {}), fused, Contract(provides=("kernels",)))
    again = run_pass("legalize", make_legalize(target), fused)
    assert again.kernels is None                         # stale after a rewrite: cleared
    assert CONTRACTS["weight_streaming"].requires == ("kernels",) and "schedule" in CONTRACTS["remat"].invalidates
