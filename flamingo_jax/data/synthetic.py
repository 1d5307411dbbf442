"""A procedural multimodal corpus, so the project trains and evaluates with no downloads.

  python -m flamingo_jax.data.synthetic --out_dir=/tmp/synth --num_examples=1000 --seed=0

Images are scenes of coloured shapes (circle, square, triangle, diamond, star,
cross; small or large) on a textured background (plain, striped, dotted,
checkered); every word of every text is true of the pixels, so a model can
only lower its loss by looking. Written in the public formats of `formats.py`:

  out_dir/image_text/   captions ("two red circles and a small blue star on a striped background.")
  out_dir/interleaved/  multi-image documents whose text depends on several images
                        ("The first image has more circles than the second."), question-answer
                        documents ("<image>Question: What colour is the star? Answer: green.") and
                        few-shot-style caption lists ("<image>Output: a large red square.")
  out_dir/video_text/   moving shapes ("a blue circle moves to the right on a plain background.")
  out_dir/spm.model     SentencePiece model trained on all the corpus' text (with `<image>`)
  out_dir/data_config.json   a `Mixture` data config over the three datasets
  out_dir/eval/         held-out task families, never seen in training, for few-shot evaluation,
                        each in the public annotation format its benchmark uses:
      captioning/  relational captions ("a red circle to the left of a blue square.");
                   COCO Karpathy JSON (dataset_synth.json, splits train = support, test = query)
      vqa/         "Where is the ...?" questions; VQAv2 questions + annotations JSON (10 answers)
      classification/  is the overlaid statement about the image false? HatefulMemes jsonl
                   (label 1 = the text is false about the image)
      video_qa/    "How does the green star change during the video?" (right, left, up, down,
                   bigger) over 10 s clips at 3 FPS (30 frames, the paper's evaluation); MSVD-QA
                   layout ({train,test}_qa.json, frames/video<id>/frame<k>.jpg)
      tasks.json   where each task's files are

Everything is a deterministic function of --seed and the size flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from flamingo_jax import cli
from flamingo_jax.data.errors import DataError

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30), "pink": (240, 120, 180), "cyan": (40, 200, 210),
    "white": (250, 250, 250), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = ((200, 200, 200), (170, 150, 120), (120, 140, 160), (90, 90, 90))  # two tones per texture
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ORDINALS = ("first", "second", "third", "fourth", "fifth")
SYLLABLES = ("ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "qui", "ne", "bar", "zu", "fi", "gan", "ho",
             "pel", "tri", "wo", "xa", "yem", "ul", "cor", "ith", "ma", "sto")
CELL_WORDS = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center",
              (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # key of COLOURS
    large: bool
    cell: tuple[int, int]  # (row, col) in a 3x3 grid


@dataclasses.dataclass(frozen=True)
class Scene:
    texture: str
    background: int  # index into BACKGROUNDS
    shapes: tuple[Shape, ...]


def article(word: str) -> str:
    """'a' or 'an' for the word that follows."""
    return "an" if word[0] in "aeiou" else "a"


def plural(kind: str, count: int) -> str:
    if count == 1:
        return kind
    return kind + ("es" if kind.endswith("s") else "s")


def random_scene(rng: np.random.Generator, num_shapes: int | None = None, distinct: bool = False) -> Scene:
    """1-4 shapes in distinct grid cells; `distinct` makes every (kind, colour) different."""
    count = int(rng.integers(1, 5)) if num_shapes is None else num_shapes
    cells = [divmod(int(c), 3) for c in rng.permutation(9)[:count]]
    shapes: list[Shape] = []
    kinds = rng.permutation(len(SHAPES)) if distinct else rng.integers(0, len(SHAPES), count)
    # Few colours per scene so counts and comparisons are interesting.
    palette = rng.permutation(len(COLOURS))[: (count if distinct else int(rng.integers(1, 3)))]
    colour_names = list(COLOURS)
    for i, cell in enumerate(cells):
        colour = colour_names[palette[i] if distinct else palette[int(rng.integers(0, len(palette)))]]
        shapes.append(Shape(SHAPES[int(kinds[i])], colour, bool(rng.random() < 0.5), cell))
    return Scene(TEXTURES[int(rng.integers(0, len(TEXTURES)))], int(rng.integers(0, len(BACKGROUNDS))), tuple(shapes))


def _draw_texture(draw: ImageDraw.ImageDraw, scene: Scene, size: int) -> None:
    base = np.asarray(BACKGROUNDS[scene.background])
    light = tuple(int(v) for v in np.minimum(base + 35, 255))
    draw.rectangle([0, 0, size, size], fill=tuple(int(v) for v in base))
    step = max(4, size // 8)
    if scene.texture == "striped":
        for x in range(0, size, step):
            draw.rectangle([x, 0, x + step // 2 - 1, size], fill=light)
    elif scene.texture == "dotted":
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=light)
    elif scene.texture == "checkered":
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=light)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, colour: tuple[int, int, int], cx: float, cy: float,
                radius: float) -> None:
    r = radius
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=colour)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=colour)
    elif kind == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        draw.polygon([(cx + q * np.cos(a), cy - q * np.sin(a)) for q, a in zip(radii, angles)], fill=colour)
    elif kind == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    else:
        raise ValueError(f"unknown shape {kind!r}; use one of {SHAPES}.")


def render(scene: Scene, size: int, centres: dict[int, tuple[float, float]] | None = None,
           radii: dict[int, float] | None = None) -> np.ndarray:
    """Scene -> uint8 [size, size, 3]. `centres` and `radii` (pixels) override shapes' own (video)."""
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    _draw_texture(draw, scene, size)
    cell = size / 3
    for i, shape in enumerate(scene.shapes):
        row, col = shape.cell
        cx, cy = (centres or {}).get(i, ((col + 0.5) * cell, (row + 0.5) * cell))
        radius = (radii or {}).get(i, cell * (0.45 if shape.large else 0.28))
        _draw_shape(draw, shape.kind, COLOURS[shape.colour], cx, cy, radius)
    return np.asarray(image)


def _counts(scene: Scene) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for s in scene.shapes:
        counts[(s.colour, s.kind)] = counts.get((s.colour, s.kind), 0) + 1
    return counts


def _kind_count(scene: Scene, kind: str) -> int:
    return sum(s.kind == kind for s in scene.shapes)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A true description of what is in the scene (the training captioning family)."""
    background = f" on a {scene.texture} background"
    if len(scene.shapes) == 1:
        s = scene.shapes[0]
        size = "large" if s.large else "small"
        templates = (f"a {size} {s.colour} {s.kind} on the {CELL_WORDS[s.cell]}{background}.",
                     f"{article(s.colour)} {s.colour} {s.kind}.",
                     f"one {size} {s.colour} {s.kind}{background}.",
                     f"there is {article(s.colour)} {s.colour} {s.kind} in the {CELL_WORDS[s.cell]}.")
        return templates[int(rng.integers(0, len(templates)))]
    groups = [f"{NUMBER_WORDS[n] if n > 1 else article(colour)} {colour} {plural(kind, n)}"
              for (colour, kind), n in sorted(_counts(scene).items())]
    listed = groups[0] if len(groups) == 1 else ", ".join(groups[:-1]) + " and " + groups[-1]
    templates = (f"{listed}{background}.", f"{listed}.",
                 f"there are {NUMBER_WORDS[len(scene.shapes)]} shapes: {listed}.")
    return templates[int(rng.integers(0, len(templates)))]


def question_answer(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A question with its answer (the training VQA family: colour, count, shape, pattern)."""
    options: list[tuple[str, str]] = []
    for kind in SHAPES:
        n = _kind_count(scene, kind)
        if n:
            options.append((f"How many {plural(kind, 2)} are there?", NUMBER_WORDS[n]))
        if n == 1:
            colour = next(s.colour for s in scene.shapes if s.kind == kind)
            options.append((f"What colour is the {kind}?", colour))
    for colour in COLOURS:
        of_colour = [s for s in scene.shapes if s.colour == colour]
        if len(of_colour) == 1:
            options.append((f"What shape is the {colour} object?", of_colour[0].kind))
    options.append(("What pattern is the background?", scene.texture))
    return options[int(rng.integers(0, len(options)))]


NAME_SYLLABLES = ("ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "qui", "ne", "bar", "zu")
"""Syllables of the made-up names that naming episodes bind to what their images show."""


def made_up_name(rng: np.random.Generator) -> str:
    """A fresh name for a training episode: never one of the held-out families' names."""
    while True:
        name = "".join(rng.choice(NAME_SYLLABLES, size=int(rng.integers(2, 4))))
        if name not in HELD_OUT_NAMES:
            return name


def made_up_names(rng: np.random.Generator, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = made_up_name(rng)
        if name not in names:
            names.append(name)
    return names


# Held-out families. Each names what it shows with words the prompt's examples teach: a fixed
# naming that no training text uses (training episodes draw a fresh naming per document), so
# text-only zero-shot examples show the words but not what they name, and only image-text
# examples can teach the mapping.
HELD_OUT_SHAPE_NAMES = dict(zip(SHAPES, ("tovel", "kasa", "mine", "dorqui", "zulo", "barren")))
HELD_OUT_TEXTURE_NAMES = dict(zip(TEXTURES, ("quimi", "nezu", "renka", "losa")))
HELD_OUT_NAMES = frozenset(HELD_OUT_SHAPE_NAMES.values()) | frozenset(HELD_OUT_TEXTURE_NAMES.values())
HELD_OUT_QUESTION = "What paper is it drawn on?"
HELD_OUT_CLAIM = "the picture shows {article} {colour} {kind}"

# Training episodes: one task per document, its examples in one frame the document picks.
NAMING_FRAMES = ("Output: {name}.", "This is {a} {name}.", "It is called {a} {name}.", "Name: {name}.",
                 "We call it {a} {name}.", "Label: {name}.")
COLOURED_NAMING_FRAMES = ("Output: {name}, {colour}.", "This {colour} shape is {a} {name}.",
                          "Output: the {colour} one is {a} {name}.", "Name: {name}. Colour: {colour}.")
CLAIM_FRAMES = ("Claim: there is {a} {colour} {kind}. Correct? {answer}.",
                "Is there {a} {colour} {kind} here? {answer}.",
                "Statement: {a} {colour} {kind} is in the image. True? {answer}.")


def named_caption(scene: Scene) -> list[str]:
    """Held-out captioning family: the shape's colour (a known word) and its held-out name."""
    shape = scene.shapes[0]
    name = HELD_OUT_SHAPE_NAMES[shape.kind]
    size = "large" if shape.large else "small"
    return [f"{article(shape.colour)} {shape.colour} {name}.", f"{article(size)} {size} {shape.colour} {name}."]


def texture_question(scene: Scene) -> tuple[str, str]:
    """Held-out VQA family: the background's held-out name."""
    return HELD_OUT_QUESTION, HELD_OUT_TEXTURE_NAMES[scene.texture]


def verification_claim(scene: Scene, rng: np.random.Generator, false: bool) -> tuple[str, str]:
    """(colour, kind) of a claim that the scene has such a shape: true, or made false by changing
    its colour or its kind."""
    present = {(s.colour, s.kind) for s in scene.shapes}
    colour, kind = sorted(present)[int(rng.integers(0, len(present)))]
    if false:
        while (colour, kind) in present:
            if rng.random() < 0.5:
                colour = list(COLOURS)[int(rng.integers(0, len(COLOURS)))]
            else:
                kind = SHAPES[int(rng.integers(0, len(SHAPES)))]
    return colour, kind


def comparison(scenes: list[Scene], rng: np.random.Generator) -> str:
    """A statement that needs two of the document's images to check."""
    i, j = (int(v) for v in sorted(rng.permutation(len(scenes))[:2]))
    first, second = scenes[i], scenes[j]
    kind = SHAPES[int(rng.integers(0, len(SHAPES)))]
    choice = int(rng.integers(0, 3))
    if choice == 0:
        a, b = _kind_count(first, kind), _kind_count(second, kind)
        if a == b:
            return f"The {ORDINALS[i]} and the {ORDINALS[j]} image have the same number of {plural(kind, 2)}."
        more = "more" if a > b else "fewer"
        return f"The {ORDINALS[i]} image has {more} {plural(kind, 2)} than the {ORDINALS[j]}."
    if choice == 1:
        a, b = len(first.shapes), len(second.shapes)
        relation = "as many shapes as" if a == b else ("more shapes than" if a > b else "fewer shapes than")
        return f"The {ORDINALS[i]} image has {relation} the {ORDINALS[j]}."
    if first.texture == second.texture:
        return f"Both the {ORDINALS[i]} and the {ORDINALS[j]} image have a {first.texture} background."
    return (f"The {ORDINALS[i]} image has a {first.texture} background but the {ORDINALS[j]} has a "
            f"{second.texture} one.")


def _name(rng: np.random.Generator) -> str:
    """A capitalised made-up name of a person or place; never a held-out family's word ("Quimi")."""
    while True:
        name = "".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 4))))
        if name not in HELD_OUT_NAMES:
            return name.capitalize()


def lexicon(num_names: int = 600) -> list[str]:
    """Fixed extra tokenizer text: every corpus word and many made-up names, so that even a tiny
    corpus supports a SentencePiece vocabulary of the requested size (e.g. 512)."""
    rng = np.random.default_rng(12345)
    words = list(COLOURS) + list(SHAPES) + [plural(s, 2) for s in SHAPES] + list(TEXTURES) + list(NUMBER_WORDS)
    words += list(ORDINALS) + list(CELL_WORDS.values())
    names = [" ".join(_name(rng) for _ in range(6)) + "." for _ in range(num_names // 6)]
    return [" ".join(words)] + names


def scene_with(rng: np.random.Generator, attribute: str, value: str) -> Scene:
    """A scene whose `attribute` (kind, colour: of its one shape; texture) is `value`."""
    if attribute == "texture":
        return dataclasses.replace(random_scene(rng), texture=value)
    shape = random_scene(rng, num_shapes=1).shapes[0]
    shape = dataclasses.replace(shape, **{attribute: value})
    return dataclasses.replace(random_scene(rng, num_shapes=1), shapes=(shape,))


def naming_episode(rng: np.random.Generator) -> tuple[list[Scene], list[str]]:
    """Few-shot word learning: fresh made-up names for 2-3 values of one attribute (shape kind,
    colour or background texture), then 4-6 images each followed by its name in one frame. The
    names exist only in this document, so from the second mention on, predicting a name means
    finding the earlier image that shows the same thing: what a few-shot prompt asks of the model."""
    attribute = ("kind", "colour", "texture")[int(rng.integers(0, 3))]
    population = {"kind": SHAPES, "colour": tuple(COLOURS), "texture": TEXTURES}[attribute]
    values = [population[int(i)] for i in rng.permutation(len(population))[: int(rng.integers(2, 4))]]
    names = made_up_names(rng, len(values))
    coloured = attribute == "kind" and rng.random() < 0.5
    frames = COLOURED_NAMING_FRAMES if coloured else NAMING_FRAMES
    frame = frames[int(rng.integers(0, len(frames)))]
    scenes, texts = [], []
    for _ in range(int(rng.integers(4, 7))):
        index = int(rng.integers(0, len(values)))
        scene = scene_with(rng, attribute, values[index])
        scenes.append(scene)
        texts.append(frame.format(name=names[index], a=article(names[index]), colour=scene.shapes[0].colour))
    return scenes, texts


def claim_episode(rng: np.random.Generator) -> tuple[list[Scene], list[str]]:
    """Statement verification: 3-5 images, each with a claim about it and whether it holds."""
    frame = CLAIM_FRAMES[int(rng.integers(0, len(CLAIM_FRAMES)))]
    scenes, texts = [], []
    for _ in range(int(rng.integers(3, 6))):
        scene = random_scene(rng)
        holds = bool(rng.random() < 0.5)
        colour, kind = verification_claim(scene, rng, false=not holds)
        scenes.append(scene)
        texts.append(frame.format(a=article(colour), colour=colour, kind=kind, answer="yes" if holds else "no"))
    return scenes, texts


DOCUMENT_STYLES = ("captions", "questions", "outputs", "naming", "claims")
DOCUMENT_STYLE_WEIGHTS = (0.15, 0.15, 0.1, 0.4, 0.2)


def interleaved_document(rng: np.random.Generator, size: int, encode) -> tuple[list[Any], list[str]]:
    """One document: items (str text / bytes image) and its texts (for the tokenizer)."""
    style = DOCUMENT_STYLES[int(rng.choice(len(DOCUMENT_STYLES), p=DOCUMENT_STYLE_WEIGHTS))]
    items: list[Any] = []
    if rng.random() < 0.3:
        items.append(f"Shapes drawn by {_name(rng)} from {_name(rng)}.")
    if style in ("naming", "claims"):
        scenes, texts = (naming_episode if style == "naming" else claim_episode)(rng)
    else:
        scenes = [random_scene(rng) for _ in range(int(rng.integers(2, 5)))]
        if style == "captions":
            texts = [f"Image {NUMBER_WORDS[k + 1]}: {caption(scene, rng)}" for k, scene in enumerate(scenes)]
        elif style == "questions":
            texts = [" ".join(("Question:", q, "Answer:", a + ".")) for q, a in
                     (question_answer(scene, rng) for scene in scenes)]
        else:
            texts = [f"Output: {caption(scene, rng)}" for scene in scenes]
    for scene, text in zip(scenes, texts):
        items += [encode(render(scene, size)), text]
    if style == "captions":
        items.append(comparison(scenes, rng))
    return items, [i for i in items if isinstance(i, str)]


def video(rng: np.random.Generator, size: int, num_frames: int) -> tuple[list[np.ndarray], str]:
    """A shape moving across the frame (or growing); frames uint8 [size, size, 3] and caption.

    Motion is steady over the whole clip, so any run of sampled frames shows it."""
    scene = random_scene(rng, num_shapes=1)
    shape = scene.shapes[0]
    motion = ("right", "left", "up", "down", "grows")[int(rng.integers(0, 5))]
    lo, hi, mid = size * 0.2, size * 0.8, size * 0.5
    paths = {"right": ((lo, mid), (hi, mid)), "left": ((hi, mid), (lo, mid)), "up": ((mid, hi), (mid, lo)),
             "down": ((mid, lo), (mid, hi)), "grows": ((mid, mid), (mid, mid))}
    (x0, y0), (x1, y1) = paths[motion]
    frames = []
    for f in range(num_frames):
        a = f / max(1, num_frames - 1)
        radius = size * (0.06 + 0.22 * a) if motion == "grows" else size / 3 * (0.45 if shape.large else 0.28)
        frames.append(render(scene, size, {0: (x0 + (x1 - x0) * a, y0 + (y1 - y0) * a)}, {0: radius}))
    if motion == "grows":
        verb = "grows"
    else:
        verb = f"moves to the {motion}" if motion in ("left", "right") else f"moves {motion}"
    return frames, f"{article(shape.colour)} {shape.colour} {shape.kind} {verb} on a {scene.texture} background."


MOTIONS = ("right", "left", "up", "down", "bigger")  # held-out video QA answers: what the shape does


def motion_question(shape: Shape) -> str:
    """Held-out video QA family: one question for every motion, so only the frames tell the answer.
    Training captions say "moves to the right" / "grows"; no training text asks this."""
    return f"How does the {shape.colour} {shape.kind} change during the video?"


def motion_clip(rng: np.random.Generator, size: int, num_frames: int) -> tuple[list[np.ndarray], Shape, str]:
    """A held-out video QA clip: frames uint8 [size, size, 3], the shape asked about and its motion
    (one of MOTIONS). The shape moves steadily along a random path (or grows in place) beside a
    still shape of another kind and colour, which it is drawn over; the background is drawn once."""
    scene = random_scene(rng, num_shapes=2, distinct=True)
    mover, still = scene.shapes
    motion = MOTIONS[int(rng.integers(0, len(MOTIONS)))]
    begin, end, across = rng.uniform(0.15, 0.3) * size, rng.uniform(0.7, 0.85) * size, rng.uniform(0.25, 0.75) * size
    if motion in ("left", "up"):
        begin, end = end, begin
    if motion == "bigger":
        x, y = rng.uniform(0.35, 0.65, 2) * size
        path = ((x, y), (x, y))
    else:
        path = ((begin, across), (end, across)) if motion in ("right", "left") else ((across, begin), (across, end))
    (x0, y0), (x1, y1) = path
    cell = size / 3
    still_centre = ((still.cell[1] + 0.5) * cell, (still.cell[0] + 0.5) * cell)
    background = Image.new("RGB", (size, size))
    _draw_texture(ImageDraw.Draw(background), scene, size)
    frames = []
    for f in range(num_frames):
        a = f / max(1, num_frames - 1)
        radius = size * (0.06 + 0.22 * a) if motion == "bigger" else cell * (0.45 if mover.large else 0.28)
        image = background.copy()
        draw = ImageDraw.Draw(image)
        _draw_shape(draw, still.kind, COLOURS[still.colour], *still_centre, cell * (0.45 if still.large else 0.28))
        _draw_shape(draw, mover.kind, COLOURS[mover.colour], x0 + (x1 - x0) * a, y0 + (y1 - y0) * a, radius)
        frames.append(np.asarray(image))
    return frames, mover, motion


def _write_video_qa(out_dir: str, rng: np.random.Generator, size: int, num_support: int, num_query: int,
                    encode, num_frames: int) -> list[str]:
    """Held-out video QA in the MSVD-QA / MSRVTT-QA layout: {train,test}_qa.json (support, queries) and
    frames/video<id>/frame<k>.jpg (k from 1, unpadded: natural name order is time order).
    Returns the texts (for the tokenizer)."""
    texts: list[str] = []
    for split, first, count in (("train", 0, num_support), ("test", num_support, num_query)):
        records = []
        for video_id in range(first, first + count):
            frames, shape, motion = motion_clip(rng, size, num_frames)
            folder = os.path.join(out_dir, "frames", f"video{video_id}")
            os.makedirs(folder, exist_ok=True)
            for k, frame in enumerate(frames):
                with open(os.path.join(folder, f"frame{k + 1}.jpg"), "wb") as f:
                    f.write(encode(frame))
            question = motion_question(shape)
            records.append({"answer": motion, "id": video_id, "question": question, "video_id": video_id})
            texts.append(f"Question: {question} Answer: {motion}.")
        with open(os.path.join(out_dir, f"{split}_qa.json"), "w") as f:
            json.dump(records, f)
    return texts


# ---------------------------------------------------------------- writing
def _write_eval(out_dir: str, rng: np.random.Generator, size: int, num_support: int, num_query: int,
                encode, *, video_rng: np.random.Generator, video_seconds: float, video_fps: float) -> list[str]:
    """Held-out tasks in public annotation formats; returns their texts (the tokenizer does not train on them).
    Video QA draws from its own `video_rng`, so the other tasks do not depend on its sizes."""
    from flamingo_jax.data.images import encode_image

    texts: list[str] = []
    total = num_support + num_query
    # Captioning: COCO Karpathy split JSON.
    cap_dir = os.path.join(out_dir, "captioning")
    os.makedirs(os.path.join(cap_dir, "images"), exist_ok=True)
    entries, sentence_id = [], 0
    for i in range(total):
        scene = random_scene(rng, num_shapes=1)
        filename = f"{i:06d}.jpg"
        with open(os.path.join(cap_dir, "images", filename), "wb") as f:
            f.write(encode(render(scene, size)))
        sentences = []
        for raw in named_caption(scene):
            sentences.append({"raw": raw, "tokens": raw.rstrip(".").split(), "imgid": i, "sentid": sentence_id})
            sentence_id += 1
            texts.append(raw)
        entries.append({"filepath": "images", "filename": filename, "imgid": i, "cocoid": i,
                        "split": "train" if i < num_support else "test",
                        "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    with open(os.path.join(cap_dir, "dataset_synth.json"), "w") as f:
        json.dump({"images": entries, "dataset": "synth"}, f)

    # VQA: VQAv2 questions + annotations, one pair of files per split.
    vqa_dir = os.path.join(out_dir, "vqa")
    os.makedirs(os.path.join(vqa_dir, "images"), exist_ok=True)
    for split, first, count in (("train", 0, num_support), ("val", num_support, num_query)):
        questions, annotations = [], []
        for image_id in range(first, first + count):
            scene = random_scene(rng)
            with open(os.path.join(vqa_dir, "images", f"{image_id:012d}.jpg"), "wb") as f:
                f.write(encode(render(scene, size)))
            question, answer = texture_question(scene)
            question_id = image_id * 10
            questions.append({"image_id": image_id, "question": question, "question_id": question_id})
            annotations.append({
                "question_id": question_id, "image_id": image_id, "question_type": "what paper is",
                "answer_type": "other", "multiple_choice_answer": answer,
                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)],
            })
            texts.append(f"Question: {question} Answer: {answer}.")
        with open(os.path.join(vqa_dir, f"{split}_questions.json"), "w") as f:
            json.dump({"task_type": "Open-Ended", "data_type": "synth", "data_subtype": split,
                       "questions": questions}, f)
        with open(os.path.join(vqa_dir, f"{split}_annotations.json"), "w") as f:
            json.dump({"data_type": "synth", "data_subtype": split, "annotations": annotations}, f)

    # Classification: HatefulMemes jsonl; label 1 = the written statement is false about the image.
    cls_dir = os.path.join(out_dir, "classification")
    os.makedirs(os.path.join(cls_dir, "img"), exist_ok=True)
    for split, first, count in (("train", 0, num_support), ("dev", num_support, num_query)):
        with open(os.path.join(cls_dir, f"{split}.jsonl"), "w") as f:
            for example_id in range(first, first + count):
                scene = random_scene(rng)
                label = int(rng.random() < 0.5)
                colour, kind = verification_claim(scene, rng, false=bool(label))
                text = HELD_OUT_CLAIM.format(article=article(colour), colour=colour, kind=kind)
                image_name = f"img/{example_id:05d}.png"
                with open(os.path.join(cls_dir, image_name), "wb") as image_file:
                    image_file.write(encode_image(render(scene, size), "PNG"))
                f.write(json.dumps({"id": example_id, "img": image_name, "label": label, "text": text}) + "\n")
                texts.append(text)

    num_frames = eval_video_frames(video_seconds, video_fps)
    texts += _write_video_qa(os.path.join(out_dir, "video_qa"), video_rng, size, num_support, num_query, encode,
                             num_frames)

    tasks = {
        "captioning": {"format": "coco_karpathy", "annotations": "captioning/dataset_synth.json",
                       "image_root": "captioning", "support_split": "train", "query_split": "test",
                       "family": "captions naming the shape with held-out names (HELD_OUT_SHAPE_NAMES)"},
        "vqa": {"format": "vqav2", "image_root": "vqa/images", "image_filename": "{image_id:012d}.jpg",
                "support": {"questions": "vqa/train_questions.json", "annotations": "vqa/train_annotations.json"},
                "query": {"questions": "vqa/val_questions.json", "annotations": "vqa/val_annotations.json"},
                "family": "the background's held-out name (HELD_OUT_QUESTION, HELD_OUT_TEXTURE_NAMES)"},
        "classification": {"format": "hateful_memes", "image_root": "classification",
                           "support": "classification/train.jsonl", "query": "classification/dev.jsonl",
                           "positive_label": "the written statement is false about the image",
                           "family": "verification of held-out claims (HELD_OUT_CLAIM) in the HatefulMemes frame"},
        "video_qa": {"format": "msvd_qa", "support": "video_qa/train_qa.json", "query": "video_qa/test_qa.json",
                     "frames": "video_qa/frames", "video_dir_template": "video{video_id}", "fps": video_fps,
                     "seconds": video_seconds, "num_frames": num_frames, "answers": list(MOTIONS),
                     "family": "'How does the ... change during the video?' (held out from training)"},
    }
    with open(os.path.join(out_dir, "tasks.json"), "w") as f:
        json.dump(tasks, f, indent=1)
    return texts


def _write_validation(out_dir: str, rng: np.random.Generator, size: int, count: int, encode) -> None:
    """Held-out examples of the training distribution (not tasks): image-text pairs for the
    contrastive encoder's retrieval and documents for the LM's perplexity."""
    from flamingo_jax.data import formats

    with formats.ImageTextWriter(os.path.join(out_dir, "image_text"), "image_text", 1, overwrite=True) as writer:
        for i in range(count):
            scene = random_scene(rng)
            writer.write(encode(render(scene, size)), caption(scene, rng), example_id=f"validation-pair-{i}")
    with formats.InterleavedWriter(os.path.join(out_dir, "interleaved"), "interleaved", 1, overwrite=True) as writer:
        for i in range(count):
            writer.write(interleaved_document(rng, size, encode)[0], doc_id=f"validation-doc-{i}")


def validation_data_config(train_data: dict[str, Any], out_dir: str, batch_size: int = 20) -> dict[str, Any]:
    """`train_data` (a run's data config over the corpus in `out_dir`) over the corpus' validation
    split instead: its interleaved and image-text datasets (read them with training=False)."""
    def held_out(dataset):
        name = os.path.basename(os.path.dirname(dataset["pattern"]))
        pattern = os.path.join(out_dir, "validation", name, f"{name}-*-of-*.tfrecord")
        return dict(dataset, pattern=pattern, batch_size=batch_size)

    datasets = [held_out(d) for d in train_data["datasets"] if d["kind"] in ("interleaved", "image_text")]
    return dict(train_data, datasets=datasets)


def eval_video_frames(seconds: float, fps: float) -> int:
    """Frames per held-out video QA clip; a motion needs at least two."""
    count = round(seconds * fps)
    if not (fps > 0 and count >= 2):
        raise DataError(f"eval_video_seconds={seconds}, eval_video_fps={fps}: the held-out video QA clips need a "
                        "positive rate and at least 2 frames (e.g. 10 s at 3 FPS, the paper's 30 frames).")
    return count


def data_config(out_dir: str, *, image_size: int = 64, interleaved_batch: int = 4, pair_batch: int = 8,
                video_batch: int = 2, interleaved_len: int = 128, pair_len: int = 32, max_images: int = 5,
                num_frames: int = 4) -> dict[str, Any]:
    """A `Mixture` data config for a corpus written by `generate` (wrap in ConfigDict if wanted).

    Flips are off: the synthetic text names left and right. Loss weights are the paper's. `p_next`
    is 0: every text of a synthetic document follows the image it is about, so the paper's p_next
    (0.5, for web pages whose text may precede its image) would make half the documents' text
    cross-attend to an image it does not describe.
    """
    def pattern(name):
        return os.path.join(out_dir, name, f"{name}-*-of-*.tfrecord")

    return {
        "tokenizer": os.path.join(out_dir, "spm.model"),
        "image_size": image_size,
        "random_flip": False,
        "datasets": [
            {"name": "interleaved", "kind": "interleaved", "pattern": pattern("interleaved"),
             "batch_size": interleaved_batch, "weight": 1.0, "max_len": interleaved_len, "max_images": max_images,
             "p_next": 0.0},
            {"name": "image_text", "kind": "image_text", "pattern": pattern("image_text"),
             "batch_size": pair_batch, "weight": 0.2, "max_len": pair_len},
            {"name": "video_text", "kind": "video_text", "pattern": pattern("video_text"),
             "batch_size": video_batch, "weight": 0.03, "max_len": pair_len, "num_frames": num_frames},
        ],
    }


def generate(out_dir: str, *, num_examples: int = 1000, num_documents: int | None = None,
             num_videos: int | None = None, num_eval: int = 100, num_validation: int = 100, image_size: int = 64,
             video_seconds: int = 8, video_fps: float = 2.0, eval_video_seconds: float = 10.0,
             eval_video_fps: float = 3.0, vocab_size: int = 512, num_shards: int = 4, seed: int = 0) -> dict[str, Any]:
    """Writes the corpus (see the module docstring); returns its manifest. The held-out video QA
    clips last `eval_video_seconds` at `eval_video_fps` (default 30 frames at 3 FPS, as the paper evaluates)."""
    from flamingo_jax.data import formats, tokenizer
    from flamingo_jax.data.images import encode_image

    if num_examples < 1 or image_size < 8 or num_shards < 1:
        raise DataError(f"num_examples={num_examples}, image_size={image_size}, num_shards={num_shards}: "
                         "need >= 1 example, images of >= 8 px and >= 1 shard.")
    num_documents = max(1, num_examples // 2) if num_documents is None else num_documents
    num_videos = max(1, num_examples // 8) if num_videos is None else num_videos
    frames_per_video = max(1, round(video_seconds * video_fps))
    eval_video_frames(eval_video_seconds, eval_video_fps)  # checked before anything is written
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]

    def encode(array):
        return encode_image(array, "JPEG", quality=90)

    texts: list[str] = []
    with formats.ImageTextWriter(os.path.join(out_dir, "image_text"), "image_text", num_shards,
                                 overwrite=True) as writer:
        for i in range(num_examples):
            scene = random_scene(streams[0])
            text = caption(scene, streams[0])
            writer.write(encode(render(scene, image_size)), text, example_id=f"pair-{i}")
            texts.append(text)
    with formats.InterleavedWriter(os.path.join(out_dir, "interleaved"), "interleaved", num_shards,
                                   overwrite=True) as writer:
        for i in range(num_documents):
            items, doc_texts = interleaved_document(streams[1], image_size, encode)
            writer.write(items, doc_id=f"doc-{i}")
            texts.append(" ".join(doc_texts))
    with formats.VideoTextWriter(os.path.join(out_dir, "video_text"), "video_text", num_shards,
                                 overwrite=True) as writer:
        for i in range(num_videos):
            frames, text = video(streams[2], image_size, frames_per_video)
            writer.write([encode(f) for f in frames], video_fps, text, example_id=f"video-{i}")
            texts.append(text)
    num_support = max(1, num_eval // 2)
    # Not tokenizer text: held-out words must split into the pieces training text trains.
    _write_eval(os.path.join(out_dir, "eval"), streams[3], image_size, num_support,
                max(1, num_eval - num_support), encode, video_rng=streams[4],
                video_seconds=eval_video_seconds, video_fps=eval_video_fps)
    _write_validation(os.path.join(out_dir, "validation"), streams[5], image_size, num_validation, encode)

    text_path = os.path.join(out_dir, "text.txt")
    with open(text_path, "w") as f:
        f.write("\n".join(texts + lexicon()) + "\n")
    tokenizer.train([text_path], os.path.join(out_dir, "spm"), vocab_size, num_threads=1)
    config = data_config(out_dir, image_size=image_size)
    with open(os.path.join(out_dir, "data_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    manifest = {"seed": seed, "num_examples": num_examples, "num_documents": num_documents,
                "num_videos": num_videos, "frames_per_video": frames_per_video, "video_fps": video_fps,
                "num_eval": num_eval, "num_validation": num_validation, "eval_video_seconds": eval_video_seconds,
                "eval_video_fps": eval_video_fps, "image_size": image_size, "vocab_size": vocab_size,
                "num_shards": num_shards}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def settings_differ(out_dir: str, **settings: Any) -> dict[str, tuple[Any, Any]]:
    """{name: (the corpus' value, the asked one)} for each of `generate`'s `settings` (as its
    keyword arguments) that the corpus in `out_dir` was written with otherwise."""
    with open(os.path.join(out_dir, "manifest.json")) as f:
        manifest = json.load(f)
    return {k: (manifest.get(k), v) for k, v in settings.items() if manifest.get(k) != v}


def _main(argv: list[str]) -> int:
    import time

    from absl import flags

    fv = flags.FlagValues()
    flags.DEFINE_string("out_dir", None, "Directory to write the corpus to.", flag_values=fv)
    flags.DEFINE_integer("num_examples", 1000, "Image-text pairs (documents: half, videos: an eighth).", flag_values=fv)
    flags.DEFINE_integer("num_documents", None, "Interleaved documents (default num_examples // 2).", flag_values=fv)
    flags.DEFINE_integer("num_videos", None, "Videos (default num_examples // 8).", flag_values=fv)
    flags.DEFINE_integer("num_eval", 100, "Examples per held-out eval task (half support, half query).",
                         flag_values=fv)
    flags.DEFINE_integer("image_size", 64, "Side of the square images, pixels.", flag_values=fv)
    flags.DEFINE_integer("video_seconds", 8, "Length of each video.", flag_values=fv)
    flags.DEFINE_float("video_fps", 2.0, "Stored frames per second.", flag_values=fv)
    flags.DEFINE_float("eval_video_seconds", 10.0, "Length of each held-out video QA clip.", flag_values=fv)
    flags.DEFINE_float("eval_video_fps", 3.0, "Stored frames per second of the held-out video QA clips.",
                       flag_values=fv)
    flags.DEFINE_integer("vocab_size", 512, "SentencePiece vocabulary size.", flag_values=fv)
    flags.DEFINE_integer("num_shards", 4, "Shards per dataset (>= number of data-loading hosts).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Everything is a function of this seed.", flag_values=fv)
    cli.parse(fv, argv, __doc__)
    if not fv.out_dir:
        print("--out_dir is required.", file=sys.stderr)
        return 2
    start = time.time()
    manifest = generate(fv.out_dir, num_examples=fv.num_examples, num_documents=fv.num_documents,
                        num_videos=fv.num_videos, num_eval=fv.num_eval, image_size=fv.image_size,
                        video_seconds=fv.video_seconds, video_fps=fv.video_fps,
                        eval_video_seconds=fv.eval_video_seconds, eval_video_fps=fv.eval_video_fps,
                        vocab_size=fv.vocab_size,
                        num_shards=fv.num_shards, seed=fv.seed)
    print(json.dumps(dict(manifest, out_dir=fv.out_dir, seconds=round(time.time() - start, 1))))
    return 0


if __name__ == "__main__":
    sys.exit(cli.guard(lambda: _main(sys.argv)))
