"""``mmgraph data synth``: the embedded default dataset, made locally (nothing downloaded).

A "shapes" dataset in the LLaVA format: images with coloured shapes of several kinds, sizes and
positions; phase-1 captions; phase-2 questions and answers about colour, shape, size, position
and count, some with two images. Every answer depends only on the image(s), so a model that
ignores the images stays at chance while one that sees them can answer. Also a small word-level
tokenizer built with `tokenizers` and saved as a Hugging Face tokenizer folder.

Layout written under OUTPUT_DIR:
    images/NNNNNN.png
    phase1_train.json, phase1_eval.json     captions (plain template)
    phase2_train.json, phase2_eval.json     conversations (vicuna_v1 template)
    tokenizer/                              PreTrainedTokenizerFast (save_pretrained)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.22, "large": 0.38}
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}
NUMBERS = {1: "one", 2: "two", 3: "three"}
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]


@dataclass(frozen=True)
class Thing:
    shape: str
    color: str
    size: str
    position: str


def draw(things: list[Thing], size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 240))
    d = ImageDraw.Draw(img)
    for t in things:
        cx, cy = (v * size for v in POSITIONS[t.position])
        r = SIZES[t.size] * size / 2 * (1.0 if len(things) == 1 else 0.8)
        box = (cx - r, cy - r, cx + r, cy + r)
        if t.shape == "circle":
            d.ellipse(box, fill=COLORS[t.color])
        elif t.shape == "square":
            d.rectangle(box, fill=COLORS[t.color])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[t.color])
    return img


def _thing(rng: random.Random, position: str | None = None) -> Thing:
    return Thing(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)),
                 position or rng.choice(list(POSITIONS)))


def _caption(t: Thing) -> str:
    return f"a {t.size} {t.color} {t.shape} on the {t.position} ."


def _question(rng: random.Random, things: list[Thing]) -> tuple[str, str]:
    t = things[0]
    if len(things) > 1:
        return "how many shapes are there ?", NUMBERS[len(things)]
    kind = rng.choice(["color", "shape", "size", "position", "count"])
    return {
        "color": ("what color is the shape ?", t.color),
        "shape": ("what shape is it ?", t.shape),
        "size": ("is the shape small or large ?", t.size),
        "position": ("where is the shape ?", t.position),
        "count": ("how many shapes are there ?", NUMBERS[1]),
    }[kind]


def make_samples(n: int, rng: random.Random, phase: int, start: int, image_dir: Path, size: int) -> list[dict]:
    samples = []
    for i in range(start, start + n):
        if phase == 2 and rng.random() < 0.2:       # two images: compare them
            a, b = _thing(rng), _thing(rng)
            names = [_save(image_dir, f"{i:06d}a", [a], size), _save(image_dir, f"{i:06d}b", [b], size)]
            q = rng.choice(["color", "shape"])
            same = getattr(a, q) == getattr(b, q)
            samples.append({"id": f"shapes-{i}", "image": names, "conversations": [
                {"from": "human", "value": f"<image>\n<image>\nare the two shapes the same {q} ?"},
                {"from": "gpt", "value": "yes" if same else "no"}]})
            continue
        count = rng.choice([1, 1, 1, 2, 3]) if phase == 2 else 1
        positions = rng.sample(list(POSITIONS), count)
        things = [_thing(rng, p) for p in positions]
        name = _save(image_dir, f"{i:06d}", things, size)
        if phase == 1:
            conv = [{"from": "human", "value": "<image>\ndescribe the image ."},
                    {"from": "gpt", "value": _caption(things[0])}]
        else:
            q, a = _question(rng, things)
            conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
            if count == 1 and rng.random() < 0.3:    # a second turn about the same image
                q2, a2 = _question(rng, things)
                conv += [{"from": "human", "value": q2}, {"from": "gpt", "value": a2}]
        samples.append({"id": f"shapes-{i}", "image": name, "conversations": conv})
    return samples


def _save(image_dir: Path, stem: str, things: list[Thing], size: int) -> str:
    name = f"{stem}.png"
    tmp = image_dir / f".{name}.tmp"
    draw(things, size).save(tmp, format="PNG")
    tmp.replace(image_dir / name)
    return name


def vocabulary() -> list[str]:
    words = set()
    for text in [SYSTEM, "USER : ASSISTANT : describe the image . what color is the shape ? what shape is it ?",
                 "is the shape small or large ? where is the shape ? how many shapes are there ?",
                 "are the two shapes the same color shape ? yes no a on the"]:
        words.update(text.replace(".", " . ").replace("?", " ? ").replace(",", " , ").replace("'", " ' ").split())
    words.update(COLORS, SHAPES, SIZES, POSITIONS, NUMBERS.values())
    words.update(["user", "assistant", "USER:", "ASSISTANT:", ":", "\n"])
    return SPECIAL + sorted(words - set(SPECIAL))


def build_tokenizer(path: Path):
    """A word-level tokenizer over the dataset's closed vocabulary, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=["<image>"])
    fast.save_pretrained(str(path))
    return fast


def synth(output_dir: str | Path, num_train: int = 2000, num_eval: int = 200, seed: int = 0,
          image_size: int = 64) -> dict:
    out = Path(output_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counts = {}
    start = 0
    for phase in (1, 2):
        for split, n in (("train", num_train), ("eval", num_eval)):
            samples = make_samples(n, rng, phase, start, images, image_size)
            start += n
            path = out / f"phase{phase}_{split}.json"
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(samples, indent=1))
            tmp.replace(path)
            counts[path.name] = len(samples)
    build_tokenizer(out / "tokenizer")
    return counts
