"""civic-shapes: the synthetic accuracy task (spec: /work/shared/synth-task.md).

A small Qwen3-VL trained from scratch on two CPU cores can learn it, and answering needs the
visual tokens of objects as small as 16 px, which is exactly what token retention must not
lose. Everything is drawn from a ``numpy.random.Generator`` so that training can generate
samples on the fly (no epochs to overfit) and a seed reproduces a data set byte for byte.

Conventions (the spec leaves these open; scorers and trainers rely on them):

* sizes are written ``width x height``; an object's box is the square its shape fills
  exactly (circle, square, triangle with apex at top centre, diamond, 5-point star), so the
  pixel box ``[x, y, x + size, y + size]`` is both what is drawn and what is asked for;
* grounding boxes are ``round(1000 * x / width)`` etc. (Qwen3-VL's 0-1000 convention);
* the background noise / gradient is applied to the background only: objects keep their
  exact RGB so colour names are unambiguous.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLORS", "SHAPES", "IMAGE_SIZES", "TASKS", "SINGLE_TASKS", "MULTI_TASKS", "QUESTIONS",
    "SMALL_MAX", "SIZE_MIN", "SIZE_MAX", "Obj", "Scene", "QA",
    "sample_scene", "scene_questions", "generate_sample", "write_dataset", "to_qwen_box",
    "parse_box", "box_iou", "is_correct",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20),
    "purple": (140, 50, 170), "orange": (245, 130, 20), "black": (20, 20, 20), "cyan": (20, 190, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
# (width, height); every side a multiple of 32 so the 16-px patch grid and 2x2 merge are exact.
IMAGE_SIZES: tuple[tuple[int, int], ...] = (
    (256, 256), (448, 448), (512, 384), (384, 512), (320, 448), (448, 320),
)
SIZE_MIN, SMALL_MAX, SIZE_MAX = 16, 40, 128
P_SMALL = 0.5  # small objects are half of all objects: they are what naive pruning loses
MAX_OBJECTS = 5
MAX_OVERLAP = 0.10  # of either box's area

SINGLE_TASKS: tuple[str, ...] = ("color", "shape", "ground")
MULTI_TASKS: tuple[str, ...] = ("count", "has_color", "has_shape")
TASKS: tuple[str, ...] = SINGLE_TASKS + MULTI_TASKS
QUESTIONS: dict[str, str] = {
    "color": "What color is the shape?",
    "shape": "What shape is it?",
    "ground": "Where is the shape? Answer with a bounding box.",
    "count": "How many objects are there?",
    "has_color": "Is there a {colour} object?",
    "has_shape": "Is there a {shape}?",
}
_STAR_INNER = 0.45  # inner/outer radius: a little fatter than the regular star (0.38) so 16 px stars stay stars


@dataclass(frozen=True)
class Obj:
    """One drawn object; (x, y) is the top-left pixel of its size x size box."""

    shape: str
    color: str
    x: int
    y: int
    size: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.x + self.size, self.y + self.size)


@dataclass
class Scene:
    """A rendered image and what is in it; ``kind`` is ``single`` or ``multi``."""

    image: Image.Image
    objects: list[Obj]
    kind: str

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


@dataclass(frozen=True)
class QA:
    """One question about a scene with its answer and the spec's optional fields."""

    task: str
    question: str
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)  # "box" for ground, "size" for single


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Light plain colour, plus mild Gaussian noise or a gentle linear gradient (a third each)."""
    base = rng.integers(170, 256, size=3).astype(np.float32)
    img = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    mode = rng.integers(3)
    if mode == 1:
        img = img + rng.normal(0.0, rng.uniform(2.0, 12.0), size=img.shape)
    elif mode == 2:
        other = np.clip(base + rng.uniform(-40, 40, size=3), 170, 255)
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xs / width * np.cos(angle) + ys / height * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = base + t[..., None] * (other - base)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _polygon(shape: str, x: int, y: int, s: int) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape filling the box [x, x+s-1] x [y, y+s-1] edge to edge."""
    r = (s - 1) / 2
    cx, cy = x + r, y + r
    if shape == "square":
        return [(x, y), (x + s - 1, y), (x + s - 1, y + s - 1), (x, y + s - 1)]
    if shape == "triangle":
        return [(cx, y), (x + s - 1, y + s - 1), (x, y + s - 1)]
    if shape == "diamond":
        return [(cx, y), (x + s - 1, cy), (cx, y + s - 1), (x, cy)]
    if shape == "star":
        k = np.arange(10)
        rad = np.where(k % 2 == 0, 1.0, _STAR_INNER)
        ang = -np.pi / 2 + k * np.pi / 5
        px, py = rad * np.cos(ang), rad * np.sin(ang)
        # Stretch the star's own extent onto the box, so its box is the object's box.
        px = x + (px - px.min()) / (px.max() - px.min()) * (s - 1)
        py = y + (py - py.min()) / (py.max() - py.min()) * (s - 1)
        return list(zip(px.tolist(), py.tolist()))
    raise ValueError(f"unknown shape {shape!r}")


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, fill: Any = None) -> None:
    fill = COLORS[obj.color] if fill is None else fill
    if obj.shape == "circle":
        draw.ellipse([obj.x, obj.y, obj.x + obj.size - 1, obj.y + obj.size - 1], fill=fill)
    else:
        draw.polygon(_polygon(obj.shape, obj.x, obj.y, obj.size), fill=fill)


# --------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------


def _object_size(rng: np.random.Generator) -> int:
    if rng.random() < P_SMALL:
        return int(rng.integers(SIZE_MIN, SMALL_MAX + 1))
    return int(rng.integers(SMALL_MAX + 1, SIZE_MAX + 1))


def _overlap_ok(a: Obj, b: Obj) -> bool:
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    inter = max(0, min(ax2, bx2) - max(ax1, bx1)) * max(0, min(ay2, by2) - max(ay1, by1))
    return inter <= MAX_OVERLAP * min(a.size, b.size) ** 2


def _place(rng: np.random.Generator, width: int, height: int, placed: list[Obj],
           shape: str, color: str) -> Obj:
    """Rejection-sample a position (and, after many misses, a new size) meeting the overlap rule."""
    while True:
        size = _object_size(rng)
        for _ in range(50):
            obj = Obj(shape, color, int(rng.integers(0, width - size + 1)),
                      int(rng.integers(0, height - size + 1)), size)
            if all(_overlap_ok(obj, other) for other in placed):
                return obj


def sample_scene(
    rng: np.random.Generator,
    kind: str,
    sizes: Sequence[tuple[int, int]] = IMAGE_SIZES,
    n_objects: int | None = None,
) -> Scene:
    """Draw one image: ``single`` (one object) or ``multi`` (1-5 distinct (colour, shape) objects).

    ``sizes`` restricts the image sizes (a training curriculum may start with the cheap ones).
    """
    if kind not in ("single", "multi"):
        raise ValueError(f"kind must be 'single' or 'multi', not {kind!r}")
    width, height = sizes[int(rng.integers(len(sizes)))]
    if kind == "single":
        n = 1
    else:
        n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    objects: list[Obj] = []
    for i in chosen:
        color, shape = pairs[int(i)]
        objects.append(_place(rng, width, height, objects, shape, color))
    image = Image.fromarray(_background(rng, width, height))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj)
    return Scene(image=image, objects=objects, kind=kind)


def object_index_mask(scene: Scene) -> np.ndarray:
    """[H, W] uint8: 0 on background, k + 1 where ``scene.objects[k]`` is visible.

    Drawn with the image's own primitives in the same order, so occlusion matches pixel for pixel.
    """
    mask = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(mask)
    for k, obj in enumerate(scene.objects):
        _draw(draw, obj, fill=k + 1)
    return np.asarray(mask)


def to_qwen_box(obj: Obj, width: int, height: int) -> list[int]:
    """Pixel box -> Qwen3-VL's integer 0-1000 box relative to width and height."""
    x1, y1, x2, y2 = obj.box
    return [round(1000 * x1 / width), round(1000 * y1 / height),
            round(1000 * x2 / width), round(1000 * y2 / height)]


def _format_box(box: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(v)) for v in box) + "]"


def _single_qa(scene: Scene, task: str) -> QA:
    obj = scene.objects[0]
    if task == "color":
        return QA(task, QUESTIONS[task], obj.color, {"size": obj.size})
    if task == "shape":
        return QA(task, QUESTIONS[task], obj.shape, {"size": obj.size})
    box = to_qwen_box(obj, scene.width, scene.height)
    return QA(task, QUESTIONS[task], _format_box(box), {"box": box, "size": obj.size})


def _presence_pools(scene: Scene, task: str) -> dict[str, list[str]]:
    """The colours (or shapes) a has_* question would answer "yes" / "no" to."""
    names = list(COLORS) if task == "has_color" else list(SHAPES)
    present = {o.color if task == "has_color" else o.shape for o in scene.objects}
    return {"yes": [v for v in names if v in present], "no": [v for v in names if v not in present]}


def _presence_question(task: str, value: str, answer: str) -> QA:
    key = "colour" if task == "has_color" else "shape"
    return QA(task, QUESTIONS[task].format(**{key: value}), answer)


def _presence_qa(rng: np.random.Generator, scene: Scene, task: str) -> QA:
    """One yes/no question, "yes" with probability 1/2 (unless only one answer is possible)."""
    pools = _presence_pools(scene, task)
    want = "yes" if rng.random() < 0.5 else "no"
    if not pools[want]:  # has_shape with all five shapes present
        want = "no" if want == "yes" else "yes"
    return _presence_question(task, pools[want][int(rng.integers(len(pools[want])))], want)


def _presence_pairs(rng: np.random.Generator, scene: Scene, task: str, pairs: int) -> list[QA]:
    """Up to ``pairs`` "yes" and as many "no" questions, all about distinct values.

    Exactly balanced: asking k independent 50/50 questions without repeats runs out of "yes"
    values first (one object has one colour), which skewed training towards "no".
    """
    pools = _presence_pools(scene, task)
    m = min(pairs, len(pools["yes"]), len(pools["no"]))
    return [_presence_question(task, pools[answer][int(i)], answer)
            for answer in ("yes", "no") for i in rng.permutation(len(pools[answer]))[:m]]


PRESENCE_MODES = ("pairs", "independent")


def scene_questions(
    rng: np.random.Generator, scene: Scene, presence_pairs: int = 2, single_presence_pairs: int = 0,
    presence: str = "pairs",
) -> list[QA]:
    """Every question worth asking about a scene, in random order (a multi-turn training chat).

    Single: colour, shape, box. Multi: the count. Presence questions (``presence``):

    * ``pairs``: ``presence_pairs`` (single: ``single_presence_pairs``) exactly balanced yes/no
      pairs of has_color and of has_shape questions. In one chat the answers leak: once a pair's
      "yes" is given its "no" follows, and a single image's colour answer tells its has_color
      answers, so a model can lower that loss from the chat history without looking at the image
      (measured: training loss below chance while the held-out answer stayed "yes").
    * ``independent``: one has_color and one has_shape question per multi image, each "yes" with
      probability 1/2 as in the test split, and none on single images: nothing to read off the chat.
    """
    if presence not in PRESENCE_MODES:
        raise ValueError(f"presence must be one of {PRESENCE_MODES}, got {presence!r}")
    if scene.kind == "single":
        qas = [_single_qa(scene, t) for t in SINGLE_TASKS]
        pairs = single_presence_pairs
    else:
        qas = [QA("count", QUESTIONS["count"], str(len(scene.objects)))]
        pairs = presence_pairs
    for task in ("has_color", "has_shape"):
        if presence == "pairs":
            qas += _presence_pairs(rng, scene, task, pairs)
        elif scene.kind == "multi":
            qas.append(_presence_qa(rng, scene, task))
    return [qas[int(i)] for i in rng.permutation(len(qas))]


def generate_sample(
    rng: np.random.Generator, task: str | None = None, sizes: Sequence[tuple[int, int]] = IMAGE_SIZES
) -> tuple[Image.Image, QA]:
    """One evaluation sample: an image and one question of ``task`` (uniform over tasks if None)."""
    task = TASKS[int(rng.integers(len(TASKS)))] if task is None else task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    scene = sample_scene(rng, "single" if task in SINGLE_TASKS else "multi", sizes)
    if task in SINGLE_TASKS:
        return scene.image, _single_qa(scene, task)
    if task == "count":
        return scene.image, QA(task, QUESTIONS[task], str(len(scene.objects)))
    return scene.image, _presence_qa(rng, scene, task)


def record(sample_id: str, image_path: str, qa: QA) -> dict[str, Any]:
    """The JSONL line of a sample, with the spec's field names and order."""
    rec: dict[str, Any] = {"id": sample_id, "image": image_path, "question": qa.question,
                           "answer": qa.answer, "task": qa.task}
    rec.update({k: v for k, v in qa.extra.items() if not k.startswith("_")})
    return rec


# --------------------------------------------------------------------------------------
# Data set files
# --------------------------------------------------------------------------------------

SPLITS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}


def _split_counts(n: int) -> dict[str, int]:
    counts = {name: int(n * frac) for name, frac in SPLITS.items()}
    counts["train"] += n - sum(counts.values())
    return counts


def write_dataset(out_dir: str | Path, n: int, seed: int = 0, splits: Sequence[str] | None = None) -> dict[str, Path]:
    """Write ``n`` samples as ``{train,val,test}.jsonl`` (80/10/10) + ``images/*.png`` under out_dir.

    ``splits`` writes only those (e.g. the test split of a large set, cheaply); their content
    and ids are the same as in the full set.

    Each split balances the six tasks (round robin, then shuffled) and draws from its own
    child seed, so a split's content does not depend on the other splits' sizes' rounding.
    Ids (``s000001``...) are unique across splits; all images share one folder.
    """
    out = Path(out_dir)

    def write(rng: np.random.Generator, task: str, sample_id: str) -> dict[str, Any]:
        image, qa = generate_sample(rng, task)
        rel = f"images/{sample_id}.png"
        image.save(out / rel)
        return record(sample_id, rel, qa)

    return write_splits(out, n, seed, splits, TASKS, "s", "images", write)


def write_splits(out: Path, n: int, seed: int, splits: Sequence[str] | None, tasks: Sequence[str], prefix: str,
                 media_dir: str, write: Callable[[np.random.Generator, str, str], dict[str, Any]],
                 progress: bool = False) -> dict[str, Path]:
    """The split files of a data set: ``write(rng, task, sample_id)`` saves one sample's media and returns
    its JSONL record; tasks round robin then shuffled per split, one child seed a split, ids unique."""
    from tqdm import tqdm

    unknown = set(splits or ()) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; choose from {', '.join(SPLITS)}")
    (out / media_dir).mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    next_id = 1
    children = np.random.SeedSequence(seed).spawn(len(SPLITS))
    for (split, count), child in zip(_split_counts(n).items(), children):
        if splits is not None and split not in splits:
            next_id += count
            continue
        rng = np.random.default_rng(child)
        order = [tasks[i % len(tasks)] for i in range(count)]
        order = [order[int(i)] for i in rng.permutation(count)]
        lines = []
        for task in tqdm(order, desc=split, unit="sample", disable=not progress):
            lines.append(json.dumps(write(rng, task, f"{prefix}{next_id:06d}")))
            next_id += 1
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(line + "\n" for line in lines))
    return paths


# --------------------------------------------------------------------------------------
# Scoring (the spec's rules; shared by training's quick eval and any evaluator)
# --------------------------------------------------------------------------------------

_INT = re.compile(r"-?\d+")


def parse_box(text: str) -> list[int] | None:
    """The first four integers of a model's output, or None (unparseable counts as wrong)."""
    nums = _INT.findall(text)
    return [int(v) for v in nums[:4]] if len(nums) >= 4 else None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def is_correct(rec: dict[str, Any], output: str) -> bool:
    """Exact match after strip + lower case; ground: IoU >= 0.5 with ``rec["box"]``."""
    if rec["task"] == "ground":
        box = parse_box(output)
        return box is not None and box_iou(box, rec["box"]) >= 0.5
    return output.strip().lower() == str(rec["answer"]).strip().lower()
