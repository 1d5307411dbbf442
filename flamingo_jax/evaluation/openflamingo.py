"""OpenFlamingo's evaluation protocol (open_flamingo/eval), for `--prompts=openflamingo`.

OpenFlamingo-trained models read their own prompt wording; evaluating them
with the paper's templates measures a prompt mismatch, not the model. These
templates build the text OpenFlamingo's evaluator builds for the same support
examples and query:

  captioning       <image>Output:{caption}<|endofchunk|>\\n   (COCO, Flickr30K)
  VQA              <image>Question:{question} Short answer:{answer}<|endofchunk|>\\n
  HatefulMemes     <image>is an image with: '{text}' written on it. Is it hateful? Answer:{yes|no}<|endofchunk|>
  classification   <image>Output:{class name}<|endofchunk|>   (ImageNet)

No space after the open slot; generation tasks end each support example with a
newline, ranked tasks do not; a support example shows the first reference
caption (stripped) or the first annotator's answer (as given); the query is the
support text without answer and end of chunk. In our items `<image>` is a
Media and `<|endofchunk|>` is END_OF_CHUNK, which the tokenizer writes as the
`<EOC>` id (an OpenFlamingo-converted model's `<|endofchunk|>` row), so the
token ids are those of OpenFlamingo's string. Zero-shot is the same as ours
(two text-only support examples before the query): `build_prompt` applies.

Close-ended tasks (HatefulMemes, ImageNet) rank the candidates as OpenFlamingo
does: the candidate follows the open slot with no space, nothing follows it, and
its score is the mean log-probability of its tokens (`Task.rank_with_eoc`,
`Task.rank_mean_over_tokens`). OpenFlamingo ranks one support order unless its
prompt ensembling is on; `--ensemble=1` does the same here.

Post-processing follows OpenFlamingo's too: generation stops at the end of
chunk, captions are cut at a further "Output" and lose double quotes, answers
are cut at "Question"/"Answer"/"Short" and then at the first ", "; case and
whitespace are left to the metric (VQA accuracy normalises, CIDEr tokenises).
Not reproduced: OK-VQA's extra answer stemming (NLTK's WordNet lemmatiser and
tagger), which needs NLTK data files; OK-VQA uses the VQA post-processing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from flamingo_jax.evaluation.templates import (
    YES_NO,
    ClassNameTemplate,
    Example,
    PromptTemplate,
    media_of_example,
    yes_or_no,
)
from flamingo_jax.inference.items import END_OF_CHUNK, Item, Media

IMAGE_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
EXAMPLE_SEPARATOR = "\n"
"""What OpenFlamingo writes after each support example of a generation task."""


class OpenFlamingoTemplate(PromptTemplate):
    """A template whose answer follows the open slot directly (no space) and
    whose support examples end with END_OF_CHUNK and, for generation tasks,
    a newline."""

    separator: str = ""

    def continuation(self, answer: str) -> str:
        return answer

    def support(self, example: Example) -> list[Item]:
        items = [self.media(example), self.query_text(example) + self.answer(example), END_OF_CHUNK]
        return items + [self.separator] if self.separator else items


@dataclass(frozen=True)
class CaptioningTemplate(OpenFlamingoTemplate):
    """``<image>Output:{first caption, stripped}<|endofchunk|>\\n``."""

    media: Callable[[Example], Media] = media_of_example
    separator: str = EXAMPLE_SEPARATOR

    def query_text(self, example: Example) -> str:
        return "Output:"

    def answer(self, example: Example) -> str:
        if not example.captions:
            raise ValueError(f"Captioning example {example.id} has no caption to show.")
        return example.captions[0].strip()


@dataclass(frozen=True)
class VQATemplate(OpenFlamingoTemplate):
    """``<image>Question:{question} Short answer:{first answer}<|endofchunk|>\\n``:
    the question and the first annotator's answer exactly as the files give them."""

    media: Callable[[Example], Media] = media_of_example
    separator: str = EXAMPLE_SEPARATOR

    def query_text(self, example: Example) -> str:
        return f"Question:{example.question} Short answer:"

    def answer(self, example: Example) -> str:
        if not example.answers:
            raise ValueError(f"Question {example.question_id} has no answers (a test split?); "
                             "it can be a query but not a support example.")
        return example.answers[0]


@dataclass(frozen=True)
class HatefulMemesTemplate(OpenFlamingoTemplate):
    """``<image>is an image with: '{text}' written on it. Is it hateful? Answer:{yes|no}<|endofchunk|>``
    (ranked: no newline between examples). Label 1 is "yes"."""

    media: Callable[[Example], Media] = media_of_example

    def query_text(self, example: Example) -> str:
        return f"is an image with: '{example.text}' written on it. Is it hateful? Answer:"

    def answer(self, example: Example) -> str:
        return yes_or_no(example)

    def candidates(self, support_pool: Sequence[Example]) -> list[str]:
        return list(YES_NO)


@dataclass(frozen=True)
class ImageNetTemplate(OpenFlamingoTemplate):
    """``<image>Output:{class name}<|endofchunk|>`` (ImageNet; ranked, no newline).
    Candidates as for the paper's `ClassNameTemplate`."""

    media: Callable[[Example], Media] = media_of_example

    def query_text(self, example: Example) -> str:
        return "Output:"

    def answer(self, example: Example) -> str:
        if example.label is None:
            raise ValueError(f"Example {example.id} has no label.")
        return str(example.label)

    def candidates(self, support_pool: Sequence[Example]) -> list[str]:
        return ClassNameTemplate().candidates(support_pool)


def render(items: Sequence[Item]) -> str:
    """A prompt as OpenFlamingo's evaluator writes it: Media as "<image>",
    END_OF_CHUNK as "<|endofchunk|>"."""
    parts = []
    for item in items:
        if isinstance(item, Media):
            parts.append(IMAGE_TOKEN)
        elif item is END_OF_CHUNK:
            parts.append(END_OF_CHUNK_TOKEN)
        elif isinstance(item, str):
            parts.append(item)
        else:
            raise TypeError(f"Not a prompt item: {item!r}")
    return "".join(parts)


# ---------------------------------------------------------------------------
# Post-processing of generations
# ---------------------------------------------------------------------------

_END_OF_CHUNK_TEXTS = ("<EOC>", END_OF_CHUNK_TOKEN)
_VQA_PROMPT_WORDS = re.compile("Question|Answer|Short")


def _until_end_of_chunk(generated: str) -> str:
    """OpenFlamingo's generation stops at `<|endofchunk|>`; our engine already
    does, this covers text that still carries the marker."""
    for marker in _END_OF_CHUNK_TEXTS:
        generated = generated.split(marker, 1)[0]
    return generated


def postprocess_caption(generated: str) -> str:
    """Text before any "Output" (a next example begun), double quotes removed."""
    return _until_end_of_chunk(generated).split("Output", 1)[0].replace('"', "")


def postprocess_vqa(generated: str) -> str:
    """Text before the first "Question"/"Answer"/"Short", then before the first ", "."""
    answer = _VQA_PROMPT_WORDS.split(_until_end_of_chunk(generated), maxsplit=1)[0]
    return answer.split(", ", 1)[0]


TEMPLATES: dict[str, PromptTemplate] = {
    "captioning": CaptioningTemplate(),
    "vqa": VQATemplate(),
    "hateful_memes": HatefulMemesTemplate(),
    "imagenet": ImageNetTemplate(),
}
POSTPROCESS: dict[str, Callable[[str], str]] = {
    "captioning": postprocess_caption,
    "vqa": postprocess_vqa,
}

__all__ = ["CaptioningTemplate", "HatefulMemesTemplate", "ImageNetTemplate", "VQATemplate", "render",
           "postprocess_caption", "postprocess_vqa"]
