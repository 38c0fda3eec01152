"""The local byte-level BPE tokenizer with Qwen's special tokens, pre-tokenizer and a Qwen3-VL-style
chat template (the real Qwen tokenizer cannot be fetched here).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


# Qwen's special tokens in Qwen's order (the real ids start at 151643 with <|endoftext|>).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Not special in Qwen (they are printed back), but single tokens there too.
ADDED_TOKENS: tuple[str, ...] = ("<tool_call>", "</tool_call>", "<think>", "</think>")
TOKENIZER_VOCAB_SIZE = 2048

# Qwen2/Qwen3's pre-tokenizer regex: every digit is its own pre-token, so numbers are
# spelled digit by digit (box coordinates, counts), unlike GPT-2's byte-level default.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3-VL-Instruct's template without the tool-calling branches: no default system prompt,
# images/videos wherever their parts are, `add_vision_id` numbering, reasoning-free assistant
# turns. vLLM's OpenAI server detects the `for content in message.content` loop and passes
# parts as {"type": "image"} / {"type": "text", "text": ...}; HF passes {"type": "image",
# "image": ...} or {"type": "image_url", ...}; all three are matched.
CHAT_TEMPLATE = """\
{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
{%- for message in messages -%}
{{- '<|im_start|>' + message.role + '\\n' -}}
{%- if message.content is string -%}
{{- message.content -}}
{%- elif message.content -%}
{%- for content in message.content -%}
{%- if content.type == 'image' or 'image' in content or 'image_url' in content -%}
{%- set image_count.value = image_count.value + 1 -%}
{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- elif content.type == 'video' or 'video' in content or 'video_url' in content -%}
{%- set video_count.value = video_count.value + 1 -%}
{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
{%- elif 'text' in content -%}
{{- content.text -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""


# Common English words (question/answer and image-description vocabulary) so the BPE learns
# whole-word tokens for ordinary prose, not only for the templates below.
_COMMON_WORDS = """
a about above across action actually add after again against age ago agree ahead air all almost
alone along already also although always am among amount an and animal another answer any anyone
anything appear apply approach are area arm around arrive art article as ask at attention
available average away back background bad bag bank base be beautiful because become bed been
before begin behind being believe below beside best better between beyond big bill bit blank
board body both bottom box boy break bright bring brother build business but buy by call camera
can capital card care carry case catch cause cell center central century certain chance change
character charge check choice choose church circle city claim class clear close coast cold collect
college colour column come common company compare complete condition consider contain continue
control copy corner cost could count country couple course cover create cross crowd current cut
dark data date daughter day dead deal death decide deep degree describe design detail determine
develop difference different difficult dinner direction discover discuss disease distance do
doctor document does done double down draw dream dress drink drive drop during each early earth
east easy eat edge effect eight either else empty end energy enough enter entire environment
equal even evening event ever every everyone everything exactly example explain express eye face
fact fall family far farm fast father feel few field fifteen figure fill film final find fine
finger finish fire first fish five floor fly follow foot for force foreign forest forget form
forward four free friend from front full fun future game garden gas general get girl give glass
go gold good government great green ground group grow guess gun hair half hand hang happen happy
hard has have he head health hear heart heat heavy help her here high hill him his history hit
hold hole home hope horizontal hot hour how however huge human hundred idea if image important in
include increase indeed individual information inside instead interest into island it item its
itself job join just keep key kind king kitchen know land language large last late later laugh law
lay lead learn least leave leg less let letter level lie life lift like likely list listen little
live long look lose lot love low machine main major make many map mark market material matter may
maybe me mean measure meet member memory method middle might mile million mind minute miss modern
moment money month moon more morning most mother mountain mouth move much music must my name
narrow nation natural near nearly necessary need never new news next nice night nine none north
nose not note nothing notice now number object occur of off offer office often old on once one
only open operation option or order other our out outside over own page paint pair paper part
party pass past path pattern pay people perhaps period picture piece place plain plan plant play
please point police position possible power present pretty price probably problem produce product
program provide public pull purpose push put quality question quickly quite race rain raise range
rate rather reach real reason receive recent record region remain remember report rest result
return rich ride right ring rise river rock role room round row rule run safe same sand save say
scene school science score season seat second section see seem sell send sense series serve set
seven several shadow shall shape share she ship shirt shoe short should shoulder show side similar
simple since sing single sister sit situation six size skin small smile snow so social soft some
someone something sometimes song soon sort sound south space speak special speed spend sport
spring stand start state station stay step still stone stop store story straight strange strong
student study style subject such suddenly summer support sure surface system take talk tall teach
team tell ten term test text than that the their them then there these they thing think third
this those though thousand three through throw time tiny to today together too top total touch
toward town track trade travel true try turn twenty two type under understand unit until up upon
us use usually valley various vertical very view visible voice wait walk want war warm was watch
wave way we wear weather week weight well were west what wheel when where whether which while who
whole whose why wide wife will win wind wing winter with within without wonder wood word work world
would write wrong yard year yes yet you young your zero
"""


def _training_corpus() -> list[str]:
    """A small fixed corpus: chat scaffolding, image Q&A, the civic-shapes task, numbers, JSON."""
    colours = "red green blue yellow purple orange black cyan white gray brown pink".split()
    shapes = "circle square triangle diamond star rectangle oval line arrow cross".split()
    things = (
        "cat dog bird car bus truck person man woman child tree flower house building street "
        "road sky cloud sun water river lake sea boat plane train bicycle table chair cup "
        "bottle book phone computer screen window door wall floor food pizza apple banana "
        "ball kite horse cow sheep elephant zebra giraffe bear clock sign light"
    ).split()
    lines = [
        "system", "user", "assistant", "You are a helpful assistant.",
        "Describe this image.", "Describe this image in detail.", "What is in the picture?",
        "What do you see in this image? Please answer briefly.",
        "Picture 1: Picture 2: Video 1: <0.5 seconds> <1.0 seconds> <12.5 seconds>",
        "The quick brown fox jumps over the lazy dog.",
        "How many objects are there? Answer with a number.",
        "Where is the shape? Answer with a bounding box.",
        "What color is the shape? What shape is it? Is there a star?",
        "Yes. No. I don't know. It's a photo of a small object on a plain background.",
        "The image shows a street with cars, buses and people walking on the sidewalk.",
        "There are two cats sitting on a sofa next to a window, and a dog on the floor.",
        "In the top left corner there is a sign; at the bottom right, a red car is parked.",
        "Read the text in the image and translate it into English.",
        "Answer the question using a single word or phrase.",
        "The answer is correct because the object is large, bright and near the center.",
        "First, look at the left side of the picture; then compare it with the right side.",
        "Summarize the document, the chart and the table: values, labels, axes and titles.",
        "def main(): return {'key': [1, 2, 3], \"value\": null, 'ok': true, 'x': 0.25}",
        '{"id": "s000001", "image": "images/s000001.png", "question": "Is there a red object?",'
        ' "answer": "yes", "task": "has_color", "box": [112, 430, 251, 640], "size": 34}',
        "[x1, y1, x2, y2] (x, y) <ref> </ref> <box> </box> {a: b} | ~ ` @ # $ % ^ & * _ + = \\ /",
        "Price: $12.99, 45% off; call 555-0100 at 10:30 a.m. on 2024-01-31, or e-mail us!",
        "Wait... really?! Okay -- let's think step by step: 3 + 4 = 7, 6 * 7 = 42, 9 / 3 = 3.",
    ]
    for c in colours:
        for s in shapes:
            lines.append(f"Is there a {c} {s}? There is a {c} {s} in the image.")
        lines.append(f"What color is the shape? {c}. Is there a {c} object? yes no")
    for s in shapes:
        lines.append(f"What shape is it? {s}. Is there a {s}? no, there are {s}s.")
    for i, t in enumerate(things):
        lines.append(
            f"A photo of a {t} and {i + 2} {t}s. The {t} is at [{i * 17 % 1000}, "
            f"{i * 31 % 1000}, {i * 53 % 1000}, {i * 71 % 1000}]. Where is the {t}? Left of the {t}."
        )
    # Chat scaffolding as the template renders it, so role names are single tokens.
    lines += ["user\nassistant\nsystem\n\n"] * 8
    words = _COMMON_WORDS.split()
    for i in range(0, len(words), 12):
        chunk = words[i : i + 12]
        lines.append(" ".join(chunk).capitalize() + ".")
        lines.append(" ".join(w.capitalize() for w in chunk[::-1]) + "?")
    return lines * 4


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process (deterministic, well under a second)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    n_added = len(SPECIAL_TOKENS) + len(ADDED_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE - n_added, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(_training_corpus(), trainer)
    # Appended after the BPE vocabulary, as in Qwen's tokenizer.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tok.to_str()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The local Qwen-style tokenizer: eos ``<|im_end|>``, pad ``<|endoftext|>``, chat template set."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=131_072, clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@functools.lru_cache(maxsize=1)
def special_token_ids() -> dict[str, int]:
    """Ids of the special tokens in the local tokenizer (config fields and tests use them)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_tokenizer_json())
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


@functools.lru_cache(maxsize=1)
def tokenizer_size() -> int:
    """Tokens in the local tokenizer, added tokens included (the small presets' vocab_size)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json()).get_vocab_size(with_added_tokens=True)
