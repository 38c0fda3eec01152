"""`make demo`: serve the default model with --model-impl civic and ask about a real photograph
and two civic-shapes images (the trained default model's task).

Prints, for ratio 1.0 (vanilla-equivalent) and the CIVIC ratio: the answer (and the expected one),
visual tokens before/after retention (from the server's /metrics), prompt tokens and TTFT.
"""

from __future__ import annotations

import argparse
import time

import openai

from civic_vllm.client import civic_body, image_message
from civic_vllm.model_factory import default_model
from civic_vllm.prometheus import metric_value
from civic_vllm.serving import ServerConfig, VllmServer


def bundled_photo():
    """A real photograph shipped inside scikit-image (no download)."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((448, 448))


def ask(server: VllmServer, image, question: str, ratio: float) -> dict:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    metrics_before = server.metrics()
    start = time.perf_counter()
    first_token_at = None
    answer, usage = [], None
    stream = client.chat.completions.create(
        model=server.config.model,
        messages=image_message(question, [image]),
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=civic_body(ratio),
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first_token_at = first_token_at or time.perf_counter()
            answer.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    metrics_after = server.metrics()

    def delta(name: str) -> int:
        return int(metric_value(metrics_after, name) - metric_value(metrics_before, name))

    return {
        "ratio": ratio,
        "answer": "".join(answer),
        "visual_tokens": delta("civic:visual_tokens_total"),
        "visual_tokens_kept": delta("civic:visual_tokens_retained_total"),
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "ttft_s": (first_token_at or time.perf_counter()) - start,
    }


def shapes_examples() -> list[tuple[str, object, str, str]]:
    """Two civic-shapes questions the trained default model can answer: (label, image, question, truth)."""
    import numpy as np

    from civic_vllm.data import shapes

    rng = np.random.default_rng(13)
    small = shapes.sample_scene(rng, "single", [(448, 448)])
    while small.objects[0].size > shapes.SMALL_MAX:  # a small object: what naive pruning loses
        small = shapes.sample_scene(rng, "single", [(448, 448)])
    multi = shapes.sample_scene(rng, "multi", [(448, 448)])
    obj = small.objects[0]
    return [
        (f"civic-shapes, one {obj.size}px {obj.shape}", small.image, shapes.QUESTIONS["color"], obj.color),
        ("civic-shapes, several objects", multi.image, shapes.QUESTIONS["count"], str(len(multi.objects))),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="local checkpoint dir or HF repo id")
    parser.add_argument("--ratio", type=float, default=1 / 3)
    parser.add_argument("--question", default="What is in the picture?")
    args = parser.parse_args(argv)
    model = args.model or default_model()
    photo = bundled_photo()
    examples = [("skimage astronaut photograph", photo, args.question, "")] + shapes_examples()
    print(f"model: {model}\nstarting: vllm serve {model} --model-impl civic (127.0.0.1) ...", flush=True)
    with VllmServer(ServerConfig(model=model, civic=True)) as server:
        # Warm up on a mirrored copy: first-request costs are not CIVIC's, and the same
        # image would turn the measured request into a prefix-cache hit.
        ask(server, photo.transpose(0), args.question, 1.0)
        results = [(label, question, truth, [ask(server, image, question, r) for r in (1.0, args.ratio)])
                   for label, image, question, truth in examples]
    for label, question, truth, rows in results:
        note = " (the default model was trained on shapes only)" if args.model is None else ""
        expected = f"; expected answer: {truth!r}" if truth else note
        print(f"\nimage: {label}, 448x448; question: {question!r}{expected}")
        print(f"{'ratio':>6} {'visual tokens':>14} {'kept':>5} {'prompt tokens':>14} {'TTFT (s)':>9}  answer")
        for row in rows:
            print(
                f"{row['ratio']:>6.3f} {row['visual_tokens']:>14} {row['visual_tokens_kept']:>5} "
                f"{row['prompt_tokens']:>14} {row['ttft_s']:>9.3f}  {row['answer']!r}"
            )
    print("\nserver stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
