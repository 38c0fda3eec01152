"""civic-shapes-video: generation, answers read off the frames, JSONL files, and civic eval's video requests."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from civic_vllm import evaluation as E
from civic_vllm.data import shapes
from civic_vllm.data import shapes_video as SV


def _samples(task: str, n: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [SV.generate_video_sample(rng, task) for _ in range(n)]


def test_generation_is_deterministic_and_covers_sizes_and_frame_counts() -> None:
    a, b = _samples("video_count", 20, seed=5), _samples("video_count", 20, seed=5)
    for (sa, qa), (sb, qb) in zip(a, b):
        assert np.array_equal(sa.frames, sb.frames) and qa == qb
    many = [s for task in SV.VIDEO_TASKS for s, _ in _samples(task, 30, seed=1)]
    assert {s.num_frames for s in many} == set(SV.FRAME_COUNTS)
    assert {(s.frames.shape[2], s.frames.shape[1]) for s in many} == set(SV.VIDEO_SIZES)
    assert all(s.frames.dtype == np.uint8 for s in many)


def _colour_pixels(frame: np.ndarray, colour: str) -> int:
    return int(np.all(frame == np.array(shapes.COLORS[colour], dtype=np.uint8), axis=-1).sum())


def _centre(frame: np.ndarray, colour: str) -> np.ndarray:
    ys, xs = np.nonzero(np.all(frame == np.array(shapes.COLORS[colour], dtype=np.uint8), axis=-1))
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("seed", range(3))
def test_direction_answer_agrees_with_the_pixels(seed: int) -> None:
    for scene, qa in _samples("direction", seed=seed):
        colour = qa.question.split()[4]
        assert qa.question == SV.VIDEO_QUESTIONS["direction"].format(colour=colour)
        move = _centre(scene.frames[-1], colour) - _centre(scene.frames[0], colour)
        axis, sign = (0, 1) if abs(move[0]) > abs(move[1]) else (1, 1)
        expected = {(0, True): "right", (0, False): "left", (1, True): "down", (1, False): "up"}[
            (axis, bool(move[axis] * sign > 0))]
        assert qa.answer == expected and abs(move[axis]) >= 8 * (scene.num_frames - 1) - 2


def test_appearing_colour_is_absent_at_both_ends_and_shown_mid_video() -> None:
    for scene, qa in _samples("appears"):
        seen = [_colour_pixels(f, qa.answer) > 0 for f in scene.frames]
        assert not seen[0] and not seen[-1] and 2 <= sum(seen) <= 4
        others = {c for t in scene.tracks[1:] for c in t.colors}
        assert qa.answer not in others and all(_colour_pixels(scene.frames[0], c) > 0 for c in others)


def test_count_is_distinct_objects_over_the_whole_video() -> None:
    per_count = {}
    for scene, qa in _samples("video_count", 200):
        colours = {c for c in shapes.COLORS if any(_colour_pixels(f, c) > 0 for f in scene.frames)}
        assert qa.answer == str(len(colours)) == str(len(scene.tracks))
        per_count[qa.answer] = per_count.get(qa.answer, 0) + 1
    assert sorted(per_count) == ["1", "2", "3", "4"] and min(per_count.values()) >= 35  # about uniform


def test_last_colour_is_the_named_shapes_colour_in_the_last_frame() -> None:
    for scene, qa in _samples("last_color"):
        subject = scene.tracks[scene.subject]
        assert qa.question == SV.VIDEO_QUESTIONS["last_color"].format(shape=subject.shape)
        assert subject.colors[0] != subject.colors[-1] == qa.answer
        assert _colour_pixels(scene.frames[-1], qa.answer) > 0
        assert _colour_pixels(scene.frames[0], subject.colors[0]) > 0
        assert len({t.shape for t in scene.tracks}) == len(scene.tracks)  # the name is unambiguous


def test_answers_score_like_the_image_task() -> None:
    rec = {"task": "direction", "answer": "left"}
    assert shapes.is_correct(rec, " Left\n") and not shapes.is_correct(rec, "right")


def test_jsonl_round_trip_through_the_mp4_files(tmp_path: Path) -> None:
    paths = SV.write_video_dataset(tmp_path, 20, seed=3)
    again = SV.write_video_dataset(tmp_path / "again", 20, seed=3, splits=["test"])
    assert (tmp_path / "test.jsonl").read_text() == again["test"].read_text()
    samples = E.load_samples(paths["train"])
    assert len(samples) == 16 and {s.record["task"] for s in samples} == set(SV.VIDEO_TASKS)
    for s in samples[:4]:
        rec = s.record
        frames = E.read_video(s.image_path)
        assert s.is_video and rec["fps"] == SV.FPS
        assert frames.shape == (rec["frames"], rec["height"], rec["width"], 3)
    ids = [json.loads(line)["id"] for p in paths.values() for line in p.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 20
    assert E.video_profile(samples) == (max(s.record["width"] for s in samples),
                                        max(s.record["height"] for s in samples),
                                        max(s.record["frames"] for s in samples))


def test_the_shared_writer_is_the_data_url_codec(tmp_path: Path) -> None:
    from civic_vllm.client import video_data_url, write_video

    scene, _ = _samples("video_count", 1)[0]
    url = video_data_url(scene.frames)
    assert base64.b64decode(url.split(",", 1)[1]) == write_video(scene.frames, tmp_path / "v.mp4").read_bytes()


# -- civic eval's video requests -------------------------------------------------------------


@pytest.mark.parametrize(("frames", "ratio", "groups"), [
    (8, 1 / 3, [2]), (6, 1 / 3, [1]), (10, 1 / 3, [1, 3]), (12, 1 / 3, [1, 4]), (8, 1.0, [0, 1, 2, 3]),
    (8, 0.5, [1, 3]), (2, 0.1, [0]), (7, 1 / 3, [2])])
def test_subsample_keeps_about_r_of_the_groups_evenly(frames: int, ratio: float, groups: list[int]) -> None:
    assert E.subsample_groups(frames, ratio) == groups
    video = np.arange(frames)[:, None, None, None] * np.ones((1, 2, 2, 3), dtype=np.uint8)
    kept = E.subsample_frames(video, ratio)[:, 0, 0, 0].tolist()
    assert kept == [f for g in groups for f in (2 * g, 2 * g + 1) if f < frames]


def test_video_request_bodies_per_method(tmp_path: Path) -> None:
    paths = SV.write_video_dataset(tmp_path, 10, seed=1, splits=["train"])
    sample = E.load_samples(paths["train"])[0]
    bodies = {m: E.chat_body(sample, "m", m, 1.0 if m == "full" else 1 / 3) for m in E.VIDEO_METHODS}
    for body in bodies.values():
        content = body["messages"][0]["content"]
        assert [p["type"] for p in content] == ["video_url", "text"] and content[1]["text"] == sample.record["question"]
        assert body["return_token_ids"] and body["max_tokens"] == E.MAX_TOKENS and body["temperature"] == 0
    assert bodies["full"]["mm_processor_kwargs"] == {"civic_policy": "full"}
    assert bodies["subsample"]["mm_processor_kwargs"] == {"civic_policy": "full"}
    assert bodies["civic"]["mm_processor_kwargs"] == {"civic_policy": "civic", "civic_ratio": 1 / 3,
                                                      "civic_video_ratio": 1 / 3}
    assert bodies["default"]["mm_processor_kwargs"] == {}
    url = bodies["full"]["messages"][0]["content"][0]["video_url"]["url"]
    assert base64.b64decode(url.split(",", 1)[1]) == sample.image_path.read_bytes()  # sent as it is
    sub = bodies["subsample"]["messages"][0]["content"][0]["video_url"]["url"]
    assert len(sub) < len(url)
    with pytest.raises(ValueError, match="does not apply to videos"):
        E.chat_body(sample, "m", "pool", 0.5)
    at_exit = E.chat_body(sample, "m", "civic", 1 / 3, exit_layer=2)["mm_processor_kwargs"]
    assert at_exit == {**bodies["civic"]["mm_processor_kwargs"], "civic_video_exit_layer": 2}
    with pytest.raises(ValueError, match="civic method only"):
        E.chat_body(sample, "m", "subsample", 1 / 3, exit_layer=2)


def test_video_and_image_records_are_checked(tmp_path: Path) -> None:
    rec = {"question": "q?", "answer": "left", "task": "direction"}
    (tmp_path / "a.jsonl").write_text(json.dumps({**rec, "video": "nope.mp4"}) + "\n")
    with pytest.raises(E.EvalDataError, match="video 'nope.mp4' not found"):
        E.load_samples(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(E.EvalDataError, match="missing field"):
        E.load_samples(tmp_path / "b.jsonl")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    (tmp_path / "c.jsonl").write_text(json.dumps({**rec, "video": "bad.mp4"}) + "\n")
    with pytest.raises(E.EvalDataError, match="cannot be read"):
        E.load_samples(tmp_path / "c.jsonl")


def test_video_training_chat_is_what_the_template_and_processor_make() -> None:
    """The video chats civic train learns from are token for token what serving feeds the model."""
    from transformers.video_utils import VideoMetadata

    from civic_vllm.client import decode_video, video_data_url
    from civic_vllm.training import train as T

    encoder = T.ChatEncoder(T.MICRO_PRESET)
    rng = np.random.default_rng(0)
    scene, qa = SV.generate_video_sample(rng, "direction")
    qas = SV.chat_questions(rng, scene, qa)
    assert sorted(q.task for q in qas) == ["direction", "video_count"]
    url = video_data_url(scene.frames)
    frames, meta = decode_video(url)
    messages = [turn for k, q in enumerate(qas) for turn in (
        {"role": "user", "content": [{"type": "video"}] * (k == 0) + [{"type": "text", "text": q.question}]},
        {"role": "assistant", "content": [{"type": "text", "text": q.answer}]})]
    proc = encoder.processor
    kwargs = dict(videos=[frames], do_sample_frames=meta["do_sample_frames"], return_tensors="pt",
                  video_metadata=[VideoMetadata(**{k: v for k, v in meta.items() if k != "do_sample_frames"})])
    for msgs, answers in ((messages, [q.answer for q in qas]), (messages[:1], None)):
        ref = proc(text=[proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=answers is None)],
                   **kwargs)
        enc = encoder.encode_video(url, [q.question for q in qas][: len(msgs) // 2 or 1], answers)
        assert torch.equal(enc.input_ids, ref["input_ids"])
        assert torch.equal(enc.mm_token_type_ids, ref["mm_token_type_ids"].long())
        assert torch.equal(enc.pixel_values_videos, ref["pixel_values_videos"])
        assert torch.equal(enc.video_grid_thw, ref["video_grid_thw"])
    enc = encoder.encode_video(url, [q.question for q in qas], [q.answer for q in qas])
    for k, q in enumerate(qas):
        assert encoder.tokenizer.decode(enc.input_ids[0, enc.answer_of == k].tolist()) == q.answer + "<|im_end|>"


def test_a_training_step_mixes_video_and_image_chats() -> None:
    from civic_vllm.training import train as T

    recipe = T.Recipe(images_per_step=4, p_video=0.5, warmup_steps=1)
    chats = T.sample_chats(np.random.default_rng(2), recipe, 0.5)
    assert {type(scene).__name__ for scene, _ in chats} == {"VideoScene", "Scene"}
    assert T.sample_chats(np.random.default_rng(2), T.Recipe(), 0.5)[0][0].image  # p_video 0: images, same stream
    model = T.build_model(T.MICRO_PRESET, seed=0)
    dense = T.DenseSupervision(model, T.MICRO_PRESET)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = T.train_step(model, opt, T.ChatEncoder(T.MICRO_PRESET), np.random.default_rng(2), recipe, 0.5, dense)
    assert set(SV.VIDEO_TASKS) & set(losses) and set(shapes.TASKS) & set(losses)
    assert all(np.isfinite(v).all() for v in losses.values())
