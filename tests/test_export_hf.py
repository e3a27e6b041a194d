"""An export the ecosystem evaluates as it is (issue 19): `mmgraph convert` from a model_dir to a
transformers folder that `AutoProcessor`, `LlavaForConditionalGeneration` and
`pipeline("image-text-to-text")` load with no edits, and that answers like `mmgraph generate`.

The model is the demo's (configs/params_mm_llava_demo_phase2.yaml: two images per sample) made
with the repository's own tools on a small synthetic set: `mmgraph data synth`, `mmgraph
preprocess`, a 3-step `mmgraph run` (weights close to the seeded init: the answers are not
right, but every token must agree).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmgraph.cli import main
from tests.conftest import CONFIGS

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
MAX_NEW = 12


def mm(cwd: Path, *args: str) -> str:
    """The CLI as users run it (a subprocess, in the folder relative paths start from)."""
    done = subprocess.run([sys.executable, "-m", "mmgraph", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A folder with data/ (synth + phase-2 shards), params.yaml (relative paths, as the demo's)
    and md/ (a model_dir from `mmgraph run`: compile/ record and checkpoints/)."""
    root = tmp_path_factory.mktemp("demo")
    mm(root, "data", "synth", "--output_dir", "data", "--num_train", "48", "--num_eval", "24", "--seed", "3")
    params = yaml.safe_load((CONFIGS / "params_mm_llava_demo_phase2.yaml").read_text())
    for section in ("train_input", "eval_input"):
        params[section].update(data_dir="data/phase2", img_data_dir="data/images")
    for key in ("checkpoint_path", "load_checkpoint_states"):
        params["runconfig"].pop(key)
    params["runconfig"].update(max_steps=3, log_steps=1, checkpoint_steps=3)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    mm(root, "preprocess", "--input_json", "data/phase2_train.json", "--image_dir", "data/images",
       "--tokenizer", "data/tokenizer", "--output_dir", "data/phase2", "--phase", "2", "--params", "params.yaml")
    mm(root, "run", "CPU", "--mode", "train", "--params", "params.yaml", "--model_dir", "md")
    return root


def convert_in(cwd: Path, *args) -> int:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return main(["convert", *map(str, args)])
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def export(demo) -> Path:
    assert convert_in(demo, "--src-fmt", "native", "--tgt-fmt", "hf", "--output-dir", "md_hf", "md") == 0
    return demo / "md_hf"


def questions(demo: Path, images: int, n: int) -> list[dict]:
    """Held-back questions with `images` images (LLaVA question JSONL rows)."""
    rows = json.loads((demo / "data" / "phase2_eval.json").read_text())
    out = []
    for r in rows:
        names = r["image"] if isinstance(r["image"], list) else [r["image"]]
        if len(names) == images:
            out.append({"question_id": r["id"], "image": names, "text": r["conversations"][0]["value"]})
    assert len(out) >= n, f"only {len(out)} questions with {images} image(s)"
    return out[:n]


def test_model_dir_exports_a_complete_transformers_folder(export, demo):
    # Was: "a model_dir is not a checkpoint", then max_num_img 2 refused, then --image-token-id
    # required, then config.json + model.safetensors only.
    names = {p.name for p in export.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
            "processor_config.json", "chat_template.jinja", "generation_config.json"} <= names
    tok = json.loads((demo / "data" / "tokenizer" / "tokenizer.json").read_text())
    image_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<image>")
    assert json.loads((export / "config.json").read_text())["image_token_index"] == image_id
    eos = next(t["id"] for t in tok["added_tokens"] if t["content"] == "</s>")
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == eos
    pre = json.loads((export / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "LlavaImageProcessor" and pre["do_pad"]
    assert pre["crop_size"] == {"height": 32, "width": 32} and pre["resample"] == 3
    assert pre["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    proc = json.loads((export / "processor_config.json").read_text())
    assert (proc["patch_size"], proc["vision_feature_select_strategy"], proc["num_additional_image_tokens"]) == \
        (8, "default", 1)


def test_checkpoint_folder_is_a_source_too(demo, tmp_path):
    ckpt = next((demo / "md" / "checkpoints").iterdir())
    assert convert_in(demo, "--src-fmt", "native", "--tgt-fmt", "hf", "--output-dir", tmp_path / "o", ckpt) == 0
    assert (tmp_path / "o" / "chat_template.jinja").is_file()


def _encoder(tokenizer: Path, phase: int):
    from mmgraph.data.preprocess import Encoder, Layout
    return Encoder(str(tokenizer), phase, Layout(96, 16, 2), None, check_images=False)


@pytest.mark.parametrize("phase", [1, 2])
def test_chat_template_reproduces_the_training_rows(demo, tmp_path, phase):
    """Golden: the processor's chat template + tokenization gives the preprocessing's own row,
    conversation with answers included (two turns, one or two images)."""
    from transformers import AutoProcessor
    template = "plain" if phase == 1 else "vicuna_v1"
    out = tmp_path / template
    assert convert_in(demo, "--src-fmt", "native", "--tgt-fmt", "hf", "--template", template,
                      "--output-dir", out, "md") == 0
    proc = AutoProcessor.from_pretrained(out, local_files_only=True)
    enc = _encoder(demo / "data" / "tokenizer", phase)
    samples = [
        [("<image>\nwhat color is the shape ?", "red"), ("what shape is it ?", "circle")],
        [("<image>\n<image>\nare the two shapes the same color ?", "yes")],
    ] if phase == 2 else [[("<image>\ndescribe the image .", "a small red circle on the left .")]]
    for turns in samples:
        convs = [t for q, a in turns for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        want = enc.encode({"image": ["x.png"] * convs[0]["value"].count("<image>"), "conversations": convs})
        messages = [m for q, a in turns for m in ({"role": "user", "content": q},
                                                  {"role": "assistant", "content": a})]
        text = proc.apply_chat_template(messages)
        got = proc.tokenizer(text, add_special_tokens=True).input_ids
        image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
        expanded = [t for i in got for t in ([i] * (16 if i == image_id else 1))]
        assert expanded == want.rows[0, :want.tokens].tolist(), text


def test_data_record_names_tokenizer_and_template(demo, tmp_path):
    """The preprocessing record (data_params.json, the Model Zoo's sections) says which tokenizer
    and template; --template overrides; a bad recorded template is named."""
    tok = tmp_path / "elsewhere_tok"
    shutil.copytree(demo / "data" / "tokenizer", tok)
    data = tmp_path / "phase1"
    shutil.copytree(demo / "data" / "phase2", data)
    record = {"setup": {"output_dir": str(data)}, "processing": {"huggingface_tokenizer": str(tok)},
              "dataset": {"template": "plain", "phase": 1}}
    (data / "data_params.json").write_text(json.dumps(record))
    params = yaml.safe_load((demo / "params.yaml").read_text())
    params["train_input"]["data_dir"] = str(data)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    src = next((demo / "md" / "checkpoints").iterdir())
    args = ["--src-fmt", "native", "--tgt-fmt", "hf", "--config", tmp_path / "p.yaml"]
    assert convert_in(demo, *args, "--output-dir", tmp_path / "a", src) == 0
    template = (tmp_path / "a" / "chat_template.jinja").read_text()
    assert "ASSISTANT" not in template                  # plain
    assert convert_in(demo, *args, "--template", "vicuna_v1", "--output-dir", tmp_path / "b", src) == 0
    assert "ASSISTANT" in (tmp_path / "b" / "chat_template.jinja").read_text()
    record["dataset"]["template"] = "alpaca"
    (data / "data_params.json").write_text(json.dumps(record))
    assert convert_in(demo, *args, "--output-dir", tmp_path / "c", src) == 2
    assert not (tmp_path / "c").exists()


def test_llava_layout_gets_tokenizer_and_image_processor(demo, tmp_path):
    assert convert_in(demo, "--src-fmt", "native", "--tgt-fmt", "llava", "--output-dir", tmp_path / "l", "md") == 0
    assert (tmp_path / "l" / "text_model_llava" / "tokenizer.json").is_file()
    pre = json.loads((tmp_path / "l" / "image_model" / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "CLIPImageProcessor" and pre["crop_size"]["height"] == 32


def _hf_answers(export: Path, demo: Path, qs: list[dict], budget) -> list[list[int]]:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    proc = AutoProcessor.from_pretrained(export, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(export, local_files_only=True).eval()
    out = []
    for q in qs:
        text = q["text"].replace("<image>", "").strip()
        msgs = [{"role": "user", "content": [{"type": "image"}] * len(q["image"]) + [{"type": "text", "text": text}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
        images = [Image.open(demo / "data" / "images" / n).convert("RGB") for n in q["image"]]
        inputs = proc(images=images, text=prompt, return_tensors="pt")
        n = inputs.input_ids.shape[1]
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=budget(n), do_sample=False)
        out.append(ids[0, n:].tolist())
    return out


@pytest.fixture(scope="module")
def cli_answers(demo, tmp_path_factory) -> dict:
    """`mmgraph generate --question_file` (the CLI, once) on 4 one-image and 3 two-image
    held-back questions: question_id -> answer text."""
    tmp = tmp_path_factory.mktemp("answers")
    qs = questions(demo, 1, 4) + questions(demo, 2, 3)
    (tmp / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    mm(demo, "generate", "--params", "params.yaml", "--checkpoint_path", "md", "--question_file", tmp / "q.jsonl",
       "--image_folder", "data/images", "--answers_file", tmp / "a.jsonl", "--max_new_tokens", MAX_NEW)
    rows = [json.loads(line) for line in (tmp / "a.jsonl").read_text().splitlines()]
    return {r["question_id"]: r["text"] for r in rows}


@pytest.mark.parametrize("images, n", [(1, 4), (2, 3)])
def test_transformers_answers_like_mmgraph_generate(export, demo, cli_answers, images, n):
    from transformers import AutoTokenizer
    qs = questions(demo, images, n)
    hf = _hf_answers(export, demo, qs, lambda k: min(MAX_NEW, 96 - k))     # generate's budget: the context
    tok = AutoTokenizer.from_pretrained(export, local_files_only=True)
    ours = [tok.decode(t, skip_special_tokens=True).strip() for t in hf]
    assert ours == [cli_answers[q["question_id"]] for q in qs]
    assert any(ours)


def test_transformers_tokens_equal_the_generator_tokens(export, demo):
    """Token for token (mmgraph's Generator, the code `mmgraph generate` runs)."""
    from mmgraph.core.config import load_params
    from mmgraph.commands.generate import Generator
    gen = Generator(load_params(demo / "params.yaml", "eval"), str(demo / "md"), str(demo / "data" / "tokenizer"))
    qs = questions(demo, 1, 3) + questions(demo, 2, 2)
    hf = _hf_answers(export, demo, qs, lambda n: min(MAX_NEW, 96 - n))
    mine = [gen.generate(q["text"], [str(demo / "data" / "images" / n) for n in q["image"]], MAX_NEW) for q in qs]
    assert hf == mine


def test_processor_pixels_equal_the_eval_transforms(export, demo):
    import torch
    from PIL import Image
    from transformers import AutoProcessor
    from mmgraph.core.config import load_params
    from mmgraph.commands.generate import Generator
    gen = Generator(load_params(demo / "params.yaml", "eval"), None, str(demo / "data" / "tokenizer"))
    names = [str(demo / "data" / "images" / n) for q in questions(demo, 2, 2) for n in q["image"]][:2]
    with Image.open(names[0]) as img:          # not square: padded to a square, then resized
        img.convert("RGB").resize((48, 28)).save(demo / "wide.png")
    names.append(str(demo / "wide.png"))
    proc = AutoProcessor.from_pretrained(export, local_files_only=True)
    pixels = proc.image_processor([Image.open(n).convert("RGB") for n in names], return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels, _eval_pixels(gen, names), rtol=0, atol=1e-6)


def _eval_pixels(gen, names):
    """mmgraph's eval transforms, one image at a time (load_images fills max_num_img slots)."""
    import torch
    return torch.cat([gen.load_images([n])[0, :1] for n in names])


def test_pipeline_answers_like_generate(export, demo, cli_answers):
    from transformers import pipeline
    # A question the model answers with some text (a 3-step model ends some replies at once).
    q = next(q for q in questions(demo, 1, 4) if cli_answers[q["question_id"]])
    image = str(demo / "data" / "images" / q["image"][0])
    pipe = pipeline("image-text-to-text", model=str(export))
    text = q["text"].replace("<image>", "").strip()
    msgs = [{"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": text}]}]
    got = pipe(text=msgs, max_new_tokens=MAX_NEW, return_full_text=False, generate_kwargs={"do_sample": False})
    assert got[0]["generated_text"].strip() == cli_answers[q["question_id"]]


def test_chat_template_of_the_tokenizer_and_bad_tokenizer(demo, tmp_path, capsys):
    """--template chat exports the tokenizer's own template; without one, or with a folder that
    is no tokenizer, the conversion stops naming the flag and writes nothing."""
    tok = tmp_path / "tok"
    shutil.copytree(demo / "data" / "tokenizer", tok)
    base = ["--src-fmt", "native", "--tgt-fmt", "hf", "md"]
    assert convert_in(demo, *base, "--template", "chat", "--output-dir", tmp_path / "none") == 2
    assert "--template: chat: the tokenizer has no chat template" in capsys.readouterr().err
    own = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    (tok / "chat_template.jinja").write_text(own)
    assert convert_in(demo, *base, "--template", "chat", "--tokenizer", tok, "--output-dir", tmp_path / "c") == 0
    assert (tmp_path / "c" / "chat_template.jinja").read_text() == own
    assert convert_in(demo, *base, "--tokenizer", tmp_path, "--output-dir", tmp_path / "bad") == 2
    assert f"{tmp_path}: not a tokenizer folder (--tokenizer)" in capsys.readouterr().err
    assert not (tmp_path / "none").exists() and not (tmp_path / "bad").exists()
