"""Few-shot prompt templates: how each task writes an example into a prompt.

Prompt formats (paper, appendix B.1.4; the same text the synthetic corpus
trains on):

  captioning       <image>Output: {caption}<EOC>
  VQA, video QA    <image>Question: {question} Answer: {answer}<EOC>
  HatefulMemes     <image>is an image with written: "{text}" on it. Is it hateful? Answer: {yes|no}<EOC>
  classification   <image>Output: {class name}<EOC>

A support example is its query prompt with ``" " + answer`` appended and then
END_OF_CHUNK; a query prompt ends at the open slot ("Output:", "Answer:") with
no trailing space, so the model's first generated token carries the space.
Zero-shot prompts (paper) are two text-only support examples, then the query.
"""

from __future__ import annotations

import abc
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from flamingo_jax.evaluation import readers
from flamingo_jax.inference.items import END_OF_CHUNK, Item, Media, merge_text, text_only

Example = Any  # a record of flamingo_jax.evaluation.readers


def media_of_example(example: Example) -> Media:
    """The visual input of a reader record: its frame folder (video QA) or its image file."""
    if getattr(example, "frames_dir", None) is not None:
        return Media(frames=readers.list_frames(example.frames_dir), fps=getattr(example, "fps", None))
    if getattr(example, "image_path", None) is not None:
        return Media(path=example.image_path)
    raise TypeError(f"No image_path or frames_dir on {type(example).__name__}: {example!r:.200}")


ANSWER_SEPARATOR = " "
"""Between the open slot ("Answer:") and the answer, in support examples and in
the candidate continuations a rank-mode engine scores."""


class PromptTemplate(abc.ABC):
    """How one task writes an example into a prompt.

    Subclasses give `query_text` (the text after the media, ending at the open
    slot) and `answer`; support and query prompts follow from them, so a
    support example always reads exactly like the query plus its answer.
    """

    media: Callable[[Example], Media]

    @abc.abstractmethod
    def query_text(self, example: Example) -> str:
        """Text after the example's media, up to and including the open slot."""

    @abc.abstractmethod
    def answer(self, example: Example) -> str:
        """The target text: what a support example shows, what scoring compares with."""

    def continuation(self, answer: str) -> str:
        """The text that follows the query prompt for `answer` (rank mode scores this)."""
        return ANSWER_SEPARATOR + answer

    def query(self, example: Example) -> list[Item]:
        """[media, text ending at the open slot], e.g. [Media, "Output:"]."""
        return [self.media(example), self.query_text(example)]

    def support(self, example: Example) -> list[Item]:
        """[media, text with the answer, END_OF_CHUNK]."""
        text = self.query_text(example) + self.continuation(self.answer(example))
        return [self.media(example), text, END_OF_CHUNK]

    def candidates(self, support_pool: Sequence[Example]) -> list[str] | None:
        """The answers a close-ended task ranks; None for open-ended tasks."""
        return None


@dataclass(frozen=True)
class CaptioningTemplate(PromptTemplate):
    """``<image>Output: {caption}<EOC>`` (COCO, Flickr30K).

    A support example shows its first reference caption: the paper does not
    say which of the five it used, and the first is a fixed, reproducible choice.
    """

    media: Callable[[Example], Media] = media_of_example
    prompt: str = "Output:"

    def query_text(self, example: Example) -> str:
        return self.prompt

    def answer(self, example: Example) -> str:
        if not example.captions:
            raise ValueError(f"Captioning example {example.id} has no caption to show.")
        return example.captions[0]


def most_common_answer(answers: Sequence[str]) -> str:
    """The answer most annotators gave (first given wins a tie): VQA's
    'multiple_choice_answer', the consensus a support example should show."""
    return Counter(a.strip() for a in answers).most_common(1)[0][0]


@dataclass(frozen=True)
class VQATemplate(PromptTemplate):
    """``<image>Question: {question} Answer: {answer}<EOC>``, the paper's wording
    (OpenFlamingo writes "Short answer:"). Also video QA, whose media is the
    video's frames as one Media. A support example shows the most common of
    its annotators' answers (VQA records) or its single answer (video QA)."""

    media: Callable[[Example], Media] = media_of_example

    def query_text(self, example: Example) -> str:
        return f"Question: {example.question.strip()} Answer:"

    def answer(self, example: Example) -> str:
        if hasattr(example, "answers"):
            if not example.answers:
                raise ValueError(f"Question {example.question_id} has no answers (a test split?); "
                                 "it can be a query but not a support example.")
            return most_common_answer(example.answers)
        return str(example.answer).strip()


YES_NO: tuple[str, str] = ("yes", "no")


def yes_or_no(example: Example) -> str:
    """A binary example's answer: "yes" for label 1 (HatefulMemes: hateful), else "no"."""
    if example.label is None:
        raise ValueError(f"Example {example.id} has no label (an unlabelled test split?).")
    return YES_NO[0] if int(example.label) == 1 else YES_NO[1]


@dataclass(frozen=True)
class HatefulMemesTemplate(PromptTemplate):
    """``<image>is an image with written: "{text}" on it. Is it hateful? Answer: {yes|no}<EOC>``.

    Close-ended: the engine ranks `YES_NO`; label 1 is "yes". `question` is a
    field so the synthetic statement-verification task can ask its own question
    in the same frame.
    """

    media: Callable[[Example], Media] = media_of_example
    question: str = "Is it hateful?"

    def query_text(self, example: Example) -> str:
        return f'is an image with written: "{example.text.strip()}" on it. {self.question} Answer:'

    def answer(self, example: Example) -> str:
        return yes_or_no(example)

    def candidates(self, support_pool: Sequence[Example]) -> list[str]:
        return list(YES_NO)


@dataclass(frozen=True)
class ClassNameTemplate(PromptTemplate):
    """``<image>Output: {class name}<EOC>`` (ImageNet-style image classification).

    PAPER_FACTS gives no classification prompt. The captioning frame is used
    because a class name is the shortest caption and the model is trained on
    "Output:" captions, so no new wording is introduced. Close-ended: the
    candidates are the class names (`example.label`), taken from the records'
    `classes` when they carry the full class list, else from the support pool.
    """

    media: Callable[[Example], Media] = media_of_example
    prompt: str = "Output:"

    def query_text(self, example: Example) -> str:
        return self.prompt

    def answer(self, example: Example) -> str:
        if example.label is None:
            raise ValueError(f"Example {example.id} has no label.")
        return str(example.label)

    def candidates(self, support_pool: Sequence[Example]) -> list[str]:
        if support_pool and getattr(support_pool[0], "classes", None):
            return list(support_pool[0].classes)
        return sorted({str(e.label) for e in support_pool if e.label is not None})


ZERO_SHOT_TEXT_EXAMPLES = 2
"""The paper's zero-shot prompts: two text-only examples of the task."""


def build_prompt(
    template: PromptTemplate,
    support: Sequence[Example],
    query: Example,
    *,
    zero_shot_text_only: Sequence[Example] = (),
) -> list[Item]:
    """Support examples in the given order, then the query.

    Zero-shot (paper): pass no support and `zero_shot_text_only` examples
    (`zero_shot_examples`), which appear without their media. Giving both is
    an error, since neither setting of the paper mixes them.
    """
    if len(support) and len(zero_shot_text_only):
        raise ValueError("build_prompt: give either support examples (few-shot) or "
                         "zero_shot_text_only examples (zero-shot), not both.")
    items: list[Item] = []
    for example in zero_shot_text_only:
        items += text_only(template.support(example))
    for example in support:
        items += template.support(example)
    items += template.query(query)
    return merge_text(items)


# ---------------------------------------------------------------------------
# Support and query selection
# ---------------------------------------------------------------------------
