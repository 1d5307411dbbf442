"""Few-shot evaluation: for each task and shot count, build prompts, decode or rank, score.

The protocol is the paper's (appendix B.1.5): a support pool of up to 2,048
training examples; for each query, `shots` support examples chosen at random
(in random order) or by RICES for classification tasks (most similar last);
zero shots means two text-only support examples; open-ended tasks decode with
beam search (beam 3) up to `<EOC>`, close-ended ones rank the candidates by
log-likelihood, averaged over permutations of the support order (prompt
ensembling). Prompts longer than the model's context lose their earliest
support examples, and the results count how often that happened. Videos are fed
as the paper evaluates them whatever the model trained with: 30 frames at 3 FPS
(`EvalSettings.video_frames`, `video_fps`; the rule: `data.frames.sample_indices`),
the learned temporal embeddings interpolated to that many frames. A blind
evaluation (`Evaluator(blind=True)`) shows the model one mean image for every
image, the control for how much of a score comes from looking.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flamingo_jax.errors import UserError
from flamingo_jax.evaluation import plots
from flamingo_jax.evaluation import support as support_lib
from flamingo_jax.evaluation.rices import RicesIndex
from flamingo_jax.evaluation.tasks import Task
from flamingo_jax.evaluation.templates import build_prompt
from flamingo_jax.inference import prompting
from flamingo_jax.inference.engine import DecodeOptions, Engine


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    shots: tuple[int, ...] = (0, 4, 32)
    num_queries: int | None = None  # None: every query of the split
    support_size: int = 2048  # the paper's support pool
    batch_size: int = 8
    num_beams: int = 3
    length_penalty: float = 0.0
    ensemble: int = 6  # support-order permutations averaged for rank tasks (1: none)
    seed: int = 0
    video_frames: int = 30  # frames fed per video (the paper's evaluation; it trains with 8)
    video_fps: float = 3.0  # at this rate when the clip's stored rate is known; 0: evenly over the clip

    def __post_init__(self):
        for name in ("support_size", "batch_size", "num_beams", "ensemble"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name}={getattr(self, name)} must be >= 1.")
        if self.num_queries is not None and self.num_queries < 1:
            raise UserError(f"--num_queries={self.num_queries} must be >= 1 (leave it unset for every query).")
        if not self.shots or min(self.shots) < 0:
            raise UserError(f"--shots needs non-negative shot counts (got {self.shots}).")
        if self.video_frames < 1:
            raise UserError(f"--video_frames={self.video_frames} must be >= 1 (the paper evaluates with 30).")
        if not self.video_fps >= 0:
            raise UserError(f"--video_fps={self.video_fps} must be > 0 (the paper's 3), or 0 to spread the frames "
                            "evenly over each clip.")


def results_stem(step: int, task_names: Sequence[str], settings: EvalSettings) -> str:
    """The results files' name, from what was evaluated: a run of other tasks, shots, queries
    or settings writes beside an earlier one instead of replacing it, and the same evaluation
    run again replaces its own files.
    e.g. `step_300.coco+vqav2.shots-0-4-32.queries-all.8f3a1c2b`."""
    tasks = "+".join(task_names) if len(task_names) <= 3 else f"{len(task_names)}-tasks"
    other = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("shots", "num_queries", "batch_size")}
    digest = hashlib.sha1(json.dumps([sorted(task_names), other], sort_keys=True).encode()).hexdigest()[:8]
    queries = "all" if settings.num_queries is None else str(settings.num_queries)
    return f"step_{step}.{tasks}.shots-{'-'.join(map(str, settings.shots))}.queries-{queries}.{digest}"


class Progress:
    """One line on stderr: done/total, rate and ETA (no dependency on tqdm)."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done = total, label, 0
        self.started = time.time()

    def advance(self, count: int) -> None:
        self.done += count
        elapsed = time.time() - self.started
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done) / max(rate, 1e-9)
        end = "\n" if self.done >= self.total else ""
        print(f"\r{self.label}: {self.done}/{self.total} | {rate:.2f}/s | elapsed {elapsed:.0f}s | "
              f"ETA {eta:.0f}s", end=end, file=sys.stderr, flush=True)


class Evaluator:
    """Runs the protocol on an engine. `blind=True` is the control that shows a score comes from
    looking: every image and video frame of every prompt (support and query) is the task's mean
    image, the pixel-wise mean of the images evaluated (the support pool and the queries used,
    as the engine prepares them: resized, normalised), computed per task. RICES then sees the
    mean image too (every support example is equally similar, so each query gets the same ones): with
    real images it would pick support examples, and so answers, by what the query shows."""

    def __init__(self, engine: Engine, settings: EvalSettings, *, blind: bool = False):
        self.engine = engine.with_video(settings.video_frames, settings.video_fps or None)
        self.settings = settings
        self.blind = blind

    # ------------------------------------------------------------------ prompts
    def _support_for(self, task: Task, pool: list, query: Any, shots: int, rng: np.random.Generator,
                     rices: RicesIndex | None, query_features: np.ndarray | None) -> list:
        if shots == 0:
            return []
        if rices is not None:
            return [pool[i] for i in rices.select(query_features, min(shots, len(pool)))]
        return support_lib.random_support(pool, min(shots, len(pool)), rng)

    def _fit(self, task: Task, support: list, query: Any, reserve: int, zero_shot: list) -> tuple[list, int]:
        """The prompt, with the earliest support (or zero-shot text) examples dropped until it
        fits the context; returns it and how many were dropped."""
        limit = self.engine.cfg.decoder.max_len - reserve
        droppable = zero_shot or support
        for dropped in range(len(droppable) + 1):
            kept = droppable[dropped:]
            items = build_prompt(task.template, [] if zero_shot else kept, query,
                                            zero_shot_text_only=kept if zero_shot else [])
            if len(prompting.encode_prompt(items, self.engine.tokenizer).ids) <= limit:
                return items, dropped
        return items, dropped  # the query alone is too long: the engine's error says so

    # ------------------------------------------------------------------ tasks
    def evaluate(self, task: Task, data_dir: Path) -> dict[str, Any]:
        """{shots: metrics + counts} for one task."""
        settings = self.settings
        support_pool, query_pool = task.load(data_dir)
        support_pool = support_lib.sample_queries(support_pool, settings.support_size, settings.seed)
        queries = support_lib.sample_queries(query_pool, settings.num_queries, settings.seed + 1)
        if not self.blind:
            return self._evaluate(task, support_pool, queries)
        with self.engine.blind([task.media(example) for example in [*support_pool, *queries]]):
            return self._evaluate(task, support_pool, queries)

    def _evaluate(self, task: Task, support_pool: list, queries: list) -> dict[str, Any]:
        settings = self.settings
        rices = query_features = None
        if task.rices and any(settings.shots):
            rices = RicesIndex.from_pool(support_pool, task.media, self.engine.media_features,
                                                   batch_size=settings.batch_size)
            query_features = self.engine.media_features([task.media(q) for q in queries],
                                                        batch_size=settings.batch_size)
        results = {}
        for shots in settings.shots:
            started = time.time()
            outputs, dropped = self._run(task, support_pool, queries, shots, rices, query_features)
            metrics = task.score(outputs, queries)
            results[str(shots)] = dict(metrics, num_queries=len(queries), prompts_shortened=dropped,
                                       seconds=round(time.time() - started, 1))
            print(f"{task.name} {shots}-shot: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()),
                  file=sys.stderr)
        return results

    def _run(self, task: Task, support_pool: list, queries: list, shots: int, rices, query_features
             ) -> tuple[list, int]:
        settings = self.settings
        rng = np.random.default_rng([settings.seed, shots])
        generating = task.mode == "generate"
        candidates = None if generating else [task.template.continuation(c) for c in task.candidates(support_pool)]
        # OpenFlamingo's ranking: the mean log-probability of a candidate's tokens (no <EOC>)
        # (the candidate's tokens as the engine scores them: after the query's text)
        query_end = [] if generating or not queries else task.template.query(queries[0])
        divisors = 1.0 if generating or not task.rank_mean_over_tokens else np.array(
            [max(1, len(prompting.continuation_ids(query_end, c, self.engine.tokenizer)) + task.rank_with_eoc)
             for c in candidates])
        reserve = task.max_new_tokens if generating else 16
        orders = [None] if generating or shots < 2 else support_lib.ensemble_orders(shots, settings.ensemble, rng)
        progress = Progress(len(queries), f"{task.name} {shots}-shot")
        outputs: list = []
        dropped = 0
        for start in range(0, len(queries), settings.batch_size):
            batch = queries[start:start + settings.batch_size]
            chosen = []
            for i, query in enumerate(batch):
                features = None if query_features is None else query_features[start + i]
                zero_shot = support_lib.zero_shot_examples(support_pool, rng) if shots == 0 else []
                chosen.append((self._support_for(task, support_pool, query, shots, rng, rices, features), zero_shot))
            if generating:
                prompts = []
                for query, (support, zero_shot) in zip(batch, chosen):
                    items, cut = self._fit(task, support, query, reserve, zero_shot)
                    prompts.append(items)
                    dropped += cut > 0
                options = DecodeOptions(method="beam", num_beams=settings.num_beams,
                                        max_new_tokens=task.max_new_tokens, length_penalty=settings.length_penalty)
                texts = self.engine.generate(prompts, options, batch_size=settings.batch_size)
                outputs.extend(task.postprocess(text) for text in texts)
            else:
                total = np.zeros((len(batch), len(candidates)))
                for order in orders:
                    prompts = []
                    for query, (support, zero_shot) in zip(batch, chosen):
                        ordered = support if order is None else support_lib.reorder(support, order)
                        items, cut = self._fit(task, ordered, query, reserve, zero_shot)
                        prompts.append(items)
                        dropped += (cut > 0) and order is orders[0]
                    total += np.stack(self.engine.score(prompts, [candidates] * len(batch),
                                                        end_with_eoc=task.rank_with_eoc,
                                                        batch_size=settings.batch_size)) / divisors
                outputs.extend(total / len(orders))
            progress.advance(len(batch))
        return outputs, int(dropped)


def markdown_table(results: dict[str, dict[str, dict[str, Any]]], metric_of: dict[str, str]) -> str:
    """Tasks as rows, shot counts as columns, each task's primary metric."""
    shots = sorted({int(s) for per_task in results.values() for s in per_task})
    lines = ["| task | metric | " + " | ".join(f"{s}-shot" for s in shots) + " |",
             "|---|---|" + "---|" * len(shots)]
    for name, per_task in results.items():
        metric = metric_of[name]
        cells = [f"{per_task[str(s)][metric]:.2f}" if str(s) in per_task else "" for s in shots]
        lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(out_dir, stem: str, results: dict, meta: dict, metric_of: dict[str, str]):
    """`<out_dir>/<stem>.json`, `.md` and `.png` (score against shots); `out_dir` is a pathlib or
    etils path (gs:// works)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, table_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=float))
    table_path.write_text(markdown_table(results, metric_of))
    plots.plot_shots(results, metric_of, out_dir / f"{stem}.png")
    return json_path, table_path


def parse_ints(values: Sequence[str] | str, flag: str = "shots") -> tuple[int, ...]:
    if isinstance(values, str):
        values = values.split(",")
    try:
        parsed = tuple(int(v) for v in values if str(v).strip())
    except ValueError as error:
        raise UserError(f"--{flag} takes comma-separated integers such as 0,4,32 (got {values!r}).") from error
    if not parsed or min(parsed) < 0:
        raise UserError(f"--{flag} needs non-negative shot counts (got {values!r}).")
    return parsed
