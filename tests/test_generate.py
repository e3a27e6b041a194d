"""Generation: the key-value cache gives the same tokens as recomputing the whole sequence;
bad input is named; batch mode writes LLaVA's answer JSONL."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mmgraph.cli import main
from mmgraph.config import load_params
from mmgraph.generate import Generator
from tests.conftest import TINY2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmgraph.synth import synth
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
    assert capsys.readouterr().err.startswith(f"mmgraph: error: {broken}: cannot read the image")
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
