"""The evaluator's prompt-overflow path: a few-shot prompt longer than the model's context loses
its earliest support examples, just enough of them to fit, and each shortened prompt is counted."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.evaluation import tasks
from flamingo_jax.evaluation.evaluator import EvalSettings, Evaluator
from flamingo_jax.evaluation.templates import build_prompt
from flamingo_jax.inference import prompting


class RecordingEngine:
    """What the evaluator needs of an engine: the context length, the tokenizer, a `generate`
    that records its prompts (and answers nothing), and `with_video` (no videos here)."""

    def __init__(self, tokenizer: Tokenizer, max_len: int):
        self.tokenizer = tokenizer
        self.cfg = SimpleNamespace(decoder=SimpleNamespace(max_len=max_len))
        self.prompts: list = []

    def generate(self, prompts, options, batch_size=None):
        self.prompts.extend(prompts)
        return [""] * len(prompts)

    def with_video(self, num_frames, fps):
        return self


def length(items, tokenizer) -> int:
    return len(prompting.encode_prompt(items, tokenizer).ids)


def test_overlong_prompts_drop_their_earliest_support_examples_and_are_counted(synthetic_corpus):
    tokenizer = Tokenizer(os.path.join(synthetic_corpus, "spm.model"))
    task = tasks.get_task("synthetic_captioning")
    support_pool, queries = task.load(Path(synthetic_corpus))
    support, query = support_pool[:4], queries[0]
    full = [length(build_prompt(task.template, support[k:], query), tokenizer) for k in range(5)]
    assert full == sorted(full, reverse=True) and len(set(full)) == 5  # each example costs tokens
    # A context that holds the query and the last two support examples, not the last three.
    max_len = full[2] + task.max_new_tokens
    engine = RecordingEngine(tokenizer, max_len)
    evaluator = Evaluator(engine, EvalSettings(shots=(4,), batch_size=2))
    items, dropped = evaluator._fit(task, support, query, task.max_new_tokens, [])
    assert dropped == 2 and items == build_prompt(task.template, support[2:], query)
    # A prompt that fits is left whole.
    roomy = Evaluator(RecordingEngine(tokenizer, full[0] + task.max_new_tokens), EvalSettings(shots=(4,)))
    assert roomy._fit(task, support, query, task.max_new_tokens, []) == (build_prompt(task.template, support, query), 0)

    # Through a whole 4-shot run: every prompt sent fits, and the shortened ones are counted.
    outputs, shortened = evaluator._run(task, support_pool, queries[:4], 4, None, None)
    assert len(outputs) == 4 and len(engine.prompts) == 4
    lengths = [length(p, tokenizer) for p in engine.prompts]
    assert all(n <= max_len - task.max_new_tokens for n in lengths), lengths
    images = [sum(isinstance(item, prompting.Media) for item in p) for p in engine.prompts]
    assert shortened == sum(n < 5 for n in images) >= 1, (shortened, images)  # 4 shots + the query, unless cut
