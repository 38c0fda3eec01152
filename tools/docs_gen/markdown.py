"""The generated blocks in the Markdown: the registry (block name -> renderer), rewriting, drift, the command."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import tools.docs_gen as package
from tools.docs_gen import accuracy, probes, serve
from tools.docs_gen.common import MARKER, ROOT

RENDERERS: dict[str, Callable[[], str]] = {
    "headline": serve.render_serve_headline,
    "serve": partial(serve.render_serve_run, "serve.json"),
    "serve-recipe": partial(serve.render_serve_run, "serve_recipe.json"),
    "serve-recipe-civic": partial(serve.render_serve_run, "serve_recipe_civic.json"),
    "serve-recipe-ctx": partial(serve.render_serve_run, "serve_recipe_ctx.json"),
    "serve-families": serve.render_serve_families,
    "kv-blocks": probes.render_kv_blocks,
    "accuracy": partial(accuracy.render_accuracy, "accuracy.json"),
    "accuracy-30min": partial(accuracy.render_accuracy, "accuracy_30min.json", validation=False),
    "accuracy-feature": partial(accuracy.render_accuracy, "accuracy_feature.json"),
    "accuracy-readout": accuracy.render_accuracy_readout,
    "object-recall": accuracy.render_object_recall,
    "proportional": partial(accuracy.render_proportional, "proportional_attention.json"),
    "proportional-student": partial(accuracy.render_proportional, "proportional_attention_student.json"),
    "distill-params": partial(accuracy.render_distill, "distill_params.json"),
    "distill-ce": partial(accuracy.render_distill, "distill_ce.json"),
    "distill-soup": accuracy.render_distill_soup,
    "depth-probe": probes.render_depth_probe,
    "soak": probes.render_soak,
    "kernels": probes.render_kernels,
    "gpu": probes.render_gpu,
    "video-serve": serve.render_video_serve,
    "video-serve-exit1": partial(serve.render_video_serve, "video_serve_exit1.json"),
    "video-kv-448": partial(serve.render_video_serve, "video_kv_448.json"),
    "video-serve-load": partial(serve.render_video_serve, "video_serve_load.json"),
    "video-serve-load30": partial(serve.render_video_serve, "video_serve_load30.json"),
    "video-serve-load40": partial(serve.render_video_serve, "video_serve_load40.json"),
    "video-serve-load448": partial(serve.render_video_serve, "video_serve_load448.json"),
    "video-accuracy": accuracy.render_video_accuracy,
    "video-accuracy-span": partial(accuracy.render_video_accuracy, "video_accuracy_span.json"),
    "video-accuracy-2560": partial(accuracy.render_video_accuracy, "video_accuracy_2560.json"),
    "video-accuracy-long": partial(accuracy.render_video_accuracy, "video_accuracy_long.json"),
}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def regenerate(text: str, where: str = "") -> str:
    """`text` with every generated block rewritten from the JSON."""

    def block(m: re.Match) -> str:
        name = m["name"]
        if name not in RENDERERS:
            raise KeyError(f"{where}: unknown generated block {name!r} (known: {', '.join(sorted(RENDERERS))})")
        return f"<!-- generated:{name} -->\n{RENDERERS[name]().rstrip()}\n<!-- /generated:{name} -->"

    return MARKER.sub(block, text)


def blocks(text: str) -> dict[str, str]:
    return {m["name"]: m["body"] for m in MARKER.finditer(text)}


def drift(files: list[Path] | None = None, root: Path = ROOT) -> list[str]:
    """One line per generated block whose text differs from what the JSON gives (paths relative to root)."""
    problems = []
    for path in files or doc_files():
        where = str(path.relative_to(root))
        text = path.read_text()
        new = blocks(regenerate(text, where))
        for name, body in blocks(text).items():
            if body != new[name]:
                problems.append(f"{where}: block '{name}' differs from benchmarks/results (run make docs)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.docs_gen", description=package.__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a block is out of date")
    args = parser.parse_args(argv)
    if args.check:
        problems = drift()
        print("\n".join(problems) or "docs: every generated block matches benchmarks/results")
        return 1 if problems else 0
    for path in doc_files():
        text = path.read_text()
        new = regenerate(text, str(path.relative_to(ROOT)))
        if new != text:
            path.write_text(new)
            print(f"docs: rewrote {path.relative_to(ROOT)}")
    return 0
