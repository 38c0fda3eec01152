"""civic-shapes conforms to /work/shared/synth-task.md (the spec every evaluator relies on)."""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from civic_vllm.cli.data import add_data_parser
from civic_vllm.data import shapes as S

SPEC_COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20),
    "purple": (140, 50, 170), "orange": (245, 130, 20), "black": (20, 20, 20), "cyan": (20, 190, 200),
}
SPEC_SIZES = {(256, 256), (448, 448), (512, 384), (384, 512), (320, 448), (448, 320)}
BOX_ANSWER = re.compile(r"^\[(\d+), (\d+), (\d+), (\d+)\]$")
QUESTION_PATTERNS = {
    "color": r"What color is the shape\?",
    "shape": r"What shape is it\?",
    "ground": r"Where is the shape\? Answer with a bounding box\.",
    "count": r"How many objects are there\?",
    "has_color": r"Is there a (red|green|blue|yellow|purple|orange|black|cyan) object\?",
    "has_shape": r"Is there a (circle|square|triangle|diamond|star)\?",
}


@pytest.fixture(scope="module")
def singles() -> list[S.Scene]:
    rng = np.random.default_rng(0)
    return [S.sample_scene(rng, "single") for _ in range(200)]


@pytest.fixture(scope="module")
def multis() -> list[S.Scene]:
    rng = np.random.default_rng(1)
    return [S.sample_scene(rng, "multi") for _ in range(200)]


@pytest.fixture(scope="module")
def samples() -> list[tuple[Image.Image, dict]]:
    rng = np.random.default_rng(2)
    out = []
    for i in range(600):
        image, qa = S.generate_sample(rng, S.TASKS[i % len(S.TASKS)])
        out.append((image, S.record(f"s{i:06d}", f"images/s{i:06d}.png", qa)))
    return out


def test_constants_match_spec() -> None:
    assert S.COLORS == SPEC_COLORS
    assert set(S.SHAPES) == {"circle", "square", "triangle", "diamond", "star"}
    assert set(S.IMAGE_SIZES) == SPEC_SIZES
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in S.IMAGE_SIZES)
    assert set(S.TASKS) == set(QUESTION_PATTERNS)


def test_images_sizes_and_light_background(singles: list[S.Scene], multis: list[S.Scene]) -> None:
    seen = set()
    for scene in singles + multis:
        assert scene.image.mode == "RGB"
        seen.add(scene.image.size)
        a = np.asarray(scene.image)
        free = np.ones(a.shape[:2], bool)
        for o in scene.objects:
            free[o.y : o.y + o.size, o.x : o.x + o.size] = False
        background = a[::3, ::3][free[::3, ::3]].astype(np.float32)  # every 9th pixel is plenty
        mean = background.mean(axis=0)
        assert (mean >= 165).all() and (mean <= 255).all(), mean  # light, noise or gradient on top
        assert background.std(axis=0).max() <= 40  # mild noise / gentle gradient only
    assert seen == SPEC_SIZES


def test_objects_are_drawn_in_exact_colour_filling_their_box(singles: list[S.Scene], multis: list[S.Scene]) -> None:
    """The tight box of the object's exact-colour pixels is the box the answer states."""
    for scene in singles:
        (o,) = scene.objects
        mask = np.all(np.asarray(scene.image) == SPEC_COLORS[o.color], axis=-1)
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == o.box
    for scene in multis:  # objects may occlude each other, but each keeps its colour somewhere
        a = np.asarray(scene.image)
        for o in scene.objects:
            assert np.all(a[o.y : o.y + o.size, o.x : o.x + o.size] == SPEC_COLORS[o.color], axis=-1).any()


def test_object_sizes_with_frequent_small_ones(singles: list[S.Scene], multis: list[S.Scene]) -> None:
    sizes = [o.size for s in singles + multis for o in s.objects]
    assert min(sizes) >= 16 and max(sizes) <= 128
    small = np.mean([s <= 40 for s in sizes])
    assert 0.4 <= small <= 0.6  # 16-40 px is a quarter of the range but half of the objects
    for s in singles + multis:
        for o in s.objects:
            assert 0 <= o.x and o.x + o.size <= s.width and 0 <= o.y and o.y + o.size <= s.height


def test_multi_images_rules(multis: list[S.Scene]) -> None:
    counts = Counter(len(s.objects) for s in multis)
    assert set(counts) == {1, 2, 3, 4, 5}
    for scene in multis:
        pairs = [(o.color, o.shape) for o in scene.objects]
        assert len(set(pairs)) == len(pairs)
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                ax1, ay1, ax2, ay2 = a.box
                bx1, by1, bx2, by2 = b.box
                inter = max(0, min(ax2, bx2) - max(ax1, bx1)) * max(0, min(ay2, by2) - max(ay1, by1))
                assert inter <= 0.1 * a.size**2 and inter <= 0.1 * b.size**2


def test_questions_and_answers(samples: list[tuple[Image.Image, dict]]) -> None:
    for _, rec in samples:
        task, q, ans = rec["task"], rec["question"], rec["answer"]
        assert re.fullmatch(QUESTION_PATTERNS[task], q), q
        assert ans == ans.lower() == ans.strip()
        if task == "color":
            assert ans in SPEC_COLORS
        elif task == "shape":
            assert ans in S.SHAPES
        elif task == "count":
            assert ans in {"1", "2", "3", "4", "5"}
        elif task in ("has_color", "has_shape"):
            assert ans in {"yes", "no"}
        if task in S.SINGLE_TASKS:
            assert 16 <= rec["size"] <= 128
        else:
            assert "size" not in rec and "box" not in rec


def test_box_convention(samples: list[tuple[Image.Image, dict]]) -> None:
    grounds = [(im, r) for im, r in samples if r["task"] == "ground"]
    assert grounds
    for image, rec in grounds:
        m = BOX_ANSWER.fullmatch(rec["answer"])
        assert m, rec["answer"]
        box = [int(v) for v in m.groups()]
        assert box == rec["box"]
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000
        # relative to width (x) and height (y): the side in pixels comes back within rounding
        w, h = image.size
        assert abs((x2 - x1) / 1000 * w - rec["size"]) <= w / 1000 + 1e-9
        assert abs((y2 - y1) / 1000 * h - rec["size"]) <= h / 1000 + 1e-9


def test_to_qwen_box_is_relative_to_width_and_height() -> None:
    obj = S.Obj("square", "red", x=128, y=96, size=64)
    assert S.to_qwen_box(obj, 512, 384) == [250, 250, 375, 417]


def test_yes_no_balance(samples: list[tuple[Image.Image, dict]]) -> None:
    for task in ("has_color", "has_shape"):
        answers = [r["answer"] for _, r in samples if r["task"] == task]
        assert len(answers) == 100
        assert 0.4 <= answers.count("yes") / len(answers) <= 0.6, task


def _presence_answers_checked(scene: S.Scene, qas: list[S.QA]) -> list[str]:
    """The has_* answers of ``qas``, each asserted true of ``scene``."""
    present = {o.color for o in scene.objects} | {o.shape for o in scene.objects}
    answers = []
    for q in qas:
        if q.task.startswith("has_"):
            word = q.question.removeprefix("Is there a ").split()[0].rstrip("?")
            assert q.answer == ("yes" if word in present else "no")
            answers.append(q.answer)
    return answers


def test_scene_questions_cover_a_scene(singles: list[S.Scene], multis: list[S.Scene]) -> None:
    rng = np.random.default_rng(5)
    qas = S.scene_questions(rng, singles[0])
    assert sorted(q.task for q in qas) == sorted(S.SINGLE_TASKS)
    qas = S.scene_questions(rng, singles[0], single_presence_pairs=1)
    assert Counter(q.task for q in qas) == {"color": 1, "shape": 1, "ground": 1, "has_color": 2, "has_shape": 2}
    answers: Counter = Counter()
    for scene in multis[:100]:
        qas = S.scene_questions(rng, scene, presence_pairs=2)
        tasks = Counter(q.task for q in qas)
        assert tasks["count"] == 1 and tasks["has_color"] in (2, 4) and tasks["has_shape"] in (0, 2, 4)
        assert len({q.question for q in qas}) == len(qas)
        answers.update(_presence_answers_checked(scene, qas))
    assert answers["yes"] == answers["no"]  # training chats are exactly balanced too


def test_independent_presence_leaks_nothing_across_a_chat(singles: list[S.Scene], multis: list[S.Scene]) -> None:
    rng = np.random.default_rng(6)
    for scene in singles[:20]:  # a single image's colour/shape answers would tell its presence answers
        assert sorted(q.task for q in S.scene_questions(rng, scene, presence="independent")) == sorted(S.SINGLE_TASKS)
    answers: Counter = Counter()
    for scene in multis:
        qas = S.scene_questions(rng, scene, presence="independent")
        assert Counter(q.task for q in qas) == {"count": 1, "has_color": 1, "has_shape": 1}
        answers.update(_presence_answers_checked(scene, qas))
    assert 0.4 <= answers["yes"] / sum(answers.values()) <= 0.6  # each 50/50, not forced to balance
    with pytest.raises(ValueError, match="presence must be one of"):
        S.scene_questions(rng, multis[0], presence="some")


def test_write_dataset_files_and_determinism(tmp_path: Path) -> None:
    paths = S.write_dataset(tmp_path / "a", 30, seed=7)
    assert {p.name for p in paths.values()} == {"train.jsonl", "val.jsonl", "test.jsonl"}
    recs = {split: [json.loads(line) for line in p.read_text().splitlines()] for split, p in paths.items()}
    assert [len(recs[s]) for s in ("train", "val", "test")] == [24, 3, 3]
    ids = [r["id"] for rs in recs.values() for r in rs]
    assert len(set(ids)) == 30 and all(re.fullmatch(r"s\d{6}", i) for i in ids)
    assert Counter(r["task"] for r in recs["train"]) == {t: 4 for t in S.TASKS}
    for split, rs in recs.items():
        for r in rs:
            required = ["id", "image", "question", "answer", "task"]
            optional = {"ground": ["box", "size"], "color": ["size"], "shape": ["size"]}.get(r["task"], [])
            assert list(r) == required + optional
            image = Image.open(paths[split].parent / r["image"])
            assert image.size in SPEC_SIZES and image.mode == "RGB"
    again = S.write_dataset(tmp_path / "b", 30, seed=7)
    other = S.write_dataset(tmp_path / "c", 30, seed=8)
    for split in paths:
        assert paths[split].read_text() == again[split].read_text()
    first = recs["train"][0]["image"]
    assert (tmp_path / "a" / first).read_bytes() == (tmp_path / "b" / first).read_bytes()
    assert paths["train"].read_text() != other["train"].read_text()
    only_test = S.write_dataset(tmp_path / "d", 30, seed=7, splits=["test"])
    assert list(only_test) == ["test"] and not (tmp_path / "d" / "train.jsonl").exists()
    assert only_test["test"].read_text() == paths["test"].read_text()
    assert len(list((tmp_path / "d" / "images").iterdir())) == 3
    with pytest.raises(ValueError, match="unknown split"):
        S.write_dataset(tmp_path / "e", 30, splits=["dev"])


def test_generate_sample_is_deterministic_per_seed() -> None:
    a_img, a = S.generate_sample(np.random.default_rng(3))
    b_img, b = S.generate_sample(np.random.default_rng(3))
    assert a == b and np.array_equal(np.asarray(a_img), np.asarray(b_img))


GROUND = {"task": "ground", "answer": "[100, 100, 300, 300]", "box": [100, 100, 300, 300]}


@pytest.mark.parametrize(
    ("rec", "output", "ok"),
    [
        ({"task": "color", "answer": "red"}, " Red\n", True),
        ({"task": "color", "answer": "red"}, "red.", False),
        ({"task": "count", "answer": "3"}, "3", True),
        (GROUND, "[110, 95, 310, 290]", True),
        (GROUND, "[200, 200, 400, 400]", False),
        (GROUND, "[100, 100, 300]", False),
    ],
)
def test_scoring(rec: dict, output: str, ok: bool) -> None:
    assert S.is_correct(rec, output) is ok


def test_cli_synth(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_data_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "synth", "--n", "12", "--seed", "1", "--out", str(tmp_path)])
    assert args.handler(args) == 0
    assert sum(1 for _ in (tmp_path / "test.jsonl").open()) == 1
