"""Generation: the key-value cache gives the same tokens as recomputing the whole sequence;
bad input is named; batch mode writes LLaVA's answer JSONL."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mmgraph.cli import main
from mmgraph.core.config import load_params
from mmgraph.commands.generate import Generator
from tests.conftest import TINY2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmgraph.data.synth import synth
    root = tmp_path_factory.mktemp("gen")
    synth(root, num_train=4, num_eval=4, seed=5)
    images = sorted((root / "images").glob("*.png"))
    params = load_params(TINY2)
    return root, images, params


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_cached_generation_equals_recomputing(world, impl):
    root, images, params = world
    gen = Generator(params, None, str(root / "tokenizer"), seed=3)
    for m in gen.model.modules():
        if hasattr(m, "impl"):
            m.impl = impl
    prompts = [("what colour is the shape ?", images[:1]),
               ("<image>\nwhere is the shape ?", images[1:2]),
               ("<image> and <image>: are the shapes the same colour ?", images[2:4]),
               ("describe", images[3:4]),
               ("same colour ?", images[:2])]                 # no marks: both images put first
    for text, imgs in prompts:
        fast = gen.generate(text, [str(i) for i in imgs], max_new_tokens=12)
        slow = gen.generate(text, [str(i) for i in imgs], max_new_tokens=12, use_cache=False)
        assert fast == slow and len(fast) >= 1, (text, fast, slow)


def test_sampling_is_seeded(world):
    root, images, params = world
    gen = Generator(params, None, str(root / "tokenizer"), seed=3)
    a = gen.generate("what shape ?", [str(images[0])], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    b = gen.generate("what shape ?", [str(images[0])], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7,
                     use_cache=False)
    assert a == b


def test_bad_input_is_named(world, tmp_path, capsys):
    root, images, _ = world
    base = ["generate", "--params", str(TINY2), "--tokenizer", str(root / "tokenizer")]
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    assert main(base + ["--image", str(broken), "--prompt", "what ?"]) == 2
    assert capsys.readouterr().err.startswith(f"mmgraph: error: {broken}: image broken.png cannot be read")
    assert main(base + ["--image", str(images[0]), "--prompt", "<image> <image> what ?"]) == 2
    assert "--prompt: 2 <image> marks but 1 images" in capsys.readouterr().err
    long = " ".join(["shape"] * 200)
    assert main(base + ["--image", str(images[0]), "--prompt", long]) == 2
    assert "the context is 96" in capsys.readouterr().err


def test_batch_mode_writes_llava_answers(world, tmp_path, capsys):
    root, images, _ = world
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"question_id": f"q{i}", "image": images[i].name,
                                               "text": "what colour is the shape ?"}) for i in range(3)))
    out = tmp_path / "answers.jsonl"
    assert main(["generate", "--params", str(TINY2), "--tokenizer", str(root / "tokenizer"), "--question_file",
                 str(questions), "--image_folder", str(root / "images"), "--answers_file", str(out),
                 "--max_new_tokens", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["q0", "q1", "q2"]
    assert all({"prompt", "text", "answer_id", "model_id", "metadata"} <= set(r) for r in rows)
    Image.open(images[0]).close()


def test_decoding_options_are_checked(world, capsys):
    root, images, _ = world
    base = ["generate", "--params", str(TINY2), "--tokenizer", str(root / "tokenizer"), "--image", str(images[0]),
            "--prompt", "what ?"]
    assert main(base + ["--max_new_tokens", "-1"]) == 2
    assert "mmgraph: error: --max_new_tokens: must be at least 1, not -1" in capsys.readouterr().err
    assert main(base + ["--top_p", "0", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--top_p: must be in (0, 1], not 0.0" in err and "--temperature: must be 0" in err


def test_decompression_bomb_and_untransformable_images_are_named(world, tmp_path, capsys, monkeypatch):
    import yaml
    from PIL import Image as PILImage
    root, images, _ = world
    base = ["generate", "--tokenizer", str(root / "tokenizer"), "--prompt", "what ?"]
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)       # 64 x 64 = 4096 pixels: a "bomb" now
    assert main(base + ["--params", str(TINY2), "--image", str(images[0])]) == 2
    assert f"mmgraph: error: {images[0]}: image {images[0].name} is too large to decode safely" in capsys.readouterr().err
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 89_478_485)
    raw = yaml.safe_load(TINY2.read_text())
    for section in ("train_input", "eval_input"):
        raw[section]["transforms"] = [{"name": "to_tensor"}]                 # no resize: 64 x 64 stays
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(raw))
    assert main(base + ["--params", str(params), "--image", str(images[0])]) == 2
    assert "the params' transforms make this image (3, 64, 64), the model takes image_data_size (3, 32, 32)" in \
        capsys.readouterr().err


def test_checkpoint_that_does_not_fit_the_params_is_named(world, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file
    from mmgraph.models import build_model
    root, images, params = world
    model, _ = build_model(params, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in state if k.endswith("position_embeddings.weight") or "embed" in k)
    state[key] = torch.zeros(1, state[key].shape[-1])
    save_file(state, str(tmp_path / "w.safetensors"))
    assert main(["generate", "--params", str(TINY2), "--tokenizer", str(root / "tokenizer"), "--checkpoint_path",
                 str(tmp_path / "w.safetensors"), "--image", str(images[0]), "--prompt", "what ?"]) == 2
    err = capsys.readouterr().err
    assert f"w.safetensors: {key}: shape (1, " in err and "but the params build" in err


def test_batch_mode_keeps_images_inside_the_image_folder(world, tmp_path, capsys):
    root, images, _ = world
    out = tmp_path / "answers.jsonl"
    for bad in ("../secret.png", str(images[0].resolve())):
        questions = tmp_path / "q.jsonl"
        questions.write_text(json.dumps({"question_id": "q0", "image": images[0].name, "text": "what ?"}) + "\n"
                             + json.dumps({"question_id": "q1", "image": bad, "text": "what ?"}) + "\n")
        assert main(["generate", "--params", str(TINY2), "--tokenizer", str(root / "tokenizer"), "--question_file",
                     str(questions), "--image_folder", str(root / "images"), "--answers_file", str(out),
                     "--max_new_tokens", "2"]) == 2
        err = capsys.readouterr().err
        assert f"mmgraph: error: {questions}: question 1: image path {bad!r}" in err
        assert not out.exists() and not (tmp_path / "answers.jsonl.tmp").exists()
    questions.write_bytes(b'{"text": "caf\xe9"}\n')
    assert main(["generate", "--params", str(TINY2), "--tokenizer", str(root / "tokenizer"), "--question_file",
                 str(questions), "--answers_file", str(out)]) == 2
    assert f"{questions}: byte 13: not UTF-8 text" in capsys.readouterr().err


def test_chat_template_prompts_like_training(world, tmp_path):
    """--template chat: the prompt goes through the chat template with the generation prompt; a
    template spelling vicuna_v1 gives the vicuna_v1 prompt tokens and image positions."""
    root, images, params = world
    from tests.test_data_modelzoo import VICUNA_JINJA
    jinja = VICUNA_JINJA + "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    vicuna = Generator(params, None, str(root / "tokenizer"), seed=3)
    chat = Generator(params, None, str(root / "tokenizer"), "chat", seed=3, chat_template=jinja)
    for prompt in ("<image>\nwhat color is the shape ?", "where is <image> the shape ?"):
        image = [str(images[0])]
        assert chat.prompt_inputs(prompt, image)[:2] == vicuna.prompt_inputs(prompt, image)[:2]
    path = tmp_path / "t.jinja"
    path.write_text(jinja)
    assert main(["generate", "--params", str(TINY2), "--tokenizer", str(root / "tokenizer"), "--chat_template",
                 str(path), "--image", str(images[0]), "--prompt", "what ?", "--max_new_tokens", "2"]) == 0
