"""The paper's recipe in miniature as a library: the two pretraining stages, Flamingo over their
exports, the backbones' own checks and few-shot evaluation with its blind control
(`python -m flamingo_jax.recipe` is its command line; bench/ablations.py runs it per row).

A config file's `get_config(stage)` gives each stage's run config; a pretraining stage whose
export exists is skipped, an interrupted stage resumes (the trainer's own resume).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flamingo_jax.errors import UserError

STAGES = ("contrastive", "lm", "flamingo")
EXPORTS = {"contrastive": "vision", "lm": "decoder"}
SYNTHETIC_TASKS = ("synthetic_captioning", "synthetic_vqa", "synthetic_classification", "synthetic_video_qa")


def load_stage_configs(path: str) -> dict[str, Any]:
    """{stage: ConfigDict} from a config file with `get_config(stage)`."""
    if not os.path.isfile(path):
        raise UserError(f"--config={path}: no such file; give a config file such as configs/tiny.py.")
    spec = importlib.util.spec_from_file_location(f"recipe_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        configs = {stage: module.get_config(stage) for stage in STAGES}
    except (TypeError, ValueError) as error:
        raise UserError(f"--config={path}: its get_config(stage) must accept each of {STAGES} ({error}); "
                        "see configs/tiny.py.") from error
    for stage, config in configs.items():
        expected = "flamingo" if stage == "flamingo" else stage
        if config.objective != expected:
            raise UserError(f"--config={path}: get_config({stage!r}) has objective {config.objective!r}; "
                            f"it should be {expected!r}.")
    return configs


def train_stage(config, workdir: str) -> dict[str, Any]:
    """One training run to its last step (resuming what is there); its figures."""
    from flamingo_jax.training.trainer import Trainer

    started = time.time()
    trainer = Trainer(config, workdir)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    if result.preempted:
        raise SystemExit(f"preempted during {workdir}; run the same command again to resume.")
    losses = [result.losses[s] for s in sorted(result.losses)]
    return {"seconds": round(time.time() - started, 1), "steps": result.step,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def run(configs: dict[str, Any], workdir: str, *, shots: tuple[int, ...] = (0, 4, 8),
        tasks: tuple[str, ...] = SYNTHETIC_TASKS, num_queries: int | None = None,
        blind_shots: tuple[int, ...] = (4,), video_shots: tuple[int, ...] = (0, 4),
        pretrained: tuple[str, ...] = ("contrastive", "lm"), log: Callable[[str], None] = print) -> dict[str, Any]:
    """The three stages, the backbone checks, Flamingo's caption loss with real, shuffled and
    blank images (`image_dependence`), the evaluation (video tasks at the `video_shots`
    among `shots`) and its blind control at `blind_shots` (captioning and VQA); returns (and
    writes) the report. `pretrained` names the pretraining stages whose export Flamingo freezes
    (an ablation leaves one out: that backbone stays random)."""
    from flamingo_jax.core.config import RunConfig
    from flamingo_jax.evaluation import backbone_checks, evaluator, image_dependence
    from flamingo_jax.evaluation.tasks import get_task
    from flamingo_jax.inference.engine import Engine

    started = time.time()
    report: dict[str, Any] = {"stages": {}, "checks": {}}
    flamingo = configs["flamingo"]
    for stage in pretrained:
        stage_dir = os.path.join(workdir, stage)
        export = os.path.join(stage_dir, "backbones", EXPORTS[stage])
        if os.path.isdir(export):
            log(f"[{stage}] its backbone is there ({export}): skipped")
        else:
            log(f"[{stage}] training ...")
            report["stages"][stage] = train_stage(configs[stage], stage_dir)
            log(f"[{stage}] {report['stages'][stage]}")
        flamingo.backbones[EXPORTS[stage]] = export
    over = ("the frozen pretrained backbones" if flamingo.model.freeze_lm
            else "the pretrained backbones, the LM trained too")
    log(f"[flamingo] training over {over} ...")
    report["stages"]["flamingo"] = train_stage(flamingo, os.path.join(workdir, "flamingo"))
    log(f"[flamingo] {report['stages']['flamingo']}")

    checks_started = time.time()
    if "contrastive" in pretrained:
        contrastive = backbone_checks.load_pretraining_run(os.path.join(workdir, "contrastive"))
        retrieval = report["checks"]["vision_retrieval"] = backbone_checks.retrieval_recall(contrastive)
        log(f"[checks] vision encoder: image-to-text recall@1 {retrieval['recall_at_1']:.1f}% among "
            f"{retrieval['num_pairs']} held-out pairs (chance {retrieval['chance_at_1']:.1f}%)")
    if "lm" in pretrained:
        lm = backbone_checks.load_pretraining_run(os.path.join(workdir, "lm"))
        ppl = report["checks"]["lm_perplexity"] = backbone_checks.perplexity(lm)
        log(f"[checks] language model: held-out perplexity {ppl['perplexity']:.2f} "
            f"(random init: {ppl['random_init_perplexity']:.1f})")
    report["checks"]["seconds"] = round(time.time() - checks_started, 1)

    engine = Engine.from_workdir(os.path.join(workdir, "flamingo"))
    if any(d["kind"] == "image_text" for d in engine.run_config.data.datasets):  # held-out captions to score
        dependence_started = time.time()
        dependence = report["checks"]["image_dependence"] = image_dependence.caption_loss_by_image(
            engine.model, RunConfig.from_config(engine.run_config))
        dependence["seconds"] = round(time.time() - dependence_started, 1)
        log(f"[checks] Flamingo: held-out caption loss {dependence['real']:.3f} with its images, "
            f"{dependence['shuffled']:.3f} shuffled, {dependence['blank']:.3f} blank "
            f"({dependence['num_pairs']} pairs)")

    eval_started = time.time()
    settings = evaluator.EvalSettings(shots=tuple(shots), num_queries=num_queries)
    runner = evaluator.Evaluator(engine, settings)
    task_list = [get_task(name) for name in tasks]
    data_dir = Path(engine.run_config.synthetic.out_dir)
    # Video prompts are 30 frames per clip: the recipe keeps them to `video_shots`, the paper's
    # comparison of interest (0 vs 4), so the main job stays within minutes on a CPU.
    video_settings = dataclasses.replace(settings, shots=tuple(s for s in shots if s in video_shots) or shots[:1])
    video_runner = evaluator.Evaluator(engine, video_settings)
    results = {task.name: (video_runner if task.kind == "video_qa" else runner).evaluate(task, data_dir)
               for task in task_list}
    metric_of = {task.name: task.primary_metric for task in task_list}
    meta = {"workdir": os.path.abspath(os.path.join(workdir, "flamingo")), "step": engine.step,
            "data_dir": str(data_dir.resolve()), "settings": dataclasses.asdict(settings), "blind": False,
            "seconds": round(time.time() - eval_started, 1)}
    stem = evaluator.results_stem(engine.step, [t.name for t in task_list], settings)
    out_dir = Path(workdir) / "flamingo" / "eval"
    json_path, table_path = evaluator.write_results(out_dir, stem, results, meta, metric_of)
    report["evaluation"] = {"results": str(json_path), "table": str(table_path), "plot": str(out_dir / f"{stem}.png"),
                            "seconds": meta["seconds"],
                            "scores": {name: {s: r[metric_of[name]] for s, r in per.items()}
                                       for name, per in results.items()}}
    open_ended = [task for task in task_list if task.mode == "generate" and task.kind != "video_qa"]
    if blind_shots and open_ended:  # the control: the same checkpoint shown only the task's mean image
        blind_settings = dataclasses.replace(settings, shots=tuple(blind_shots))
        blind_runner = evaluator.Evaluator(engine, blind_settings, blind=True)
        blind = {task.name: blind_runner.evaluate(task, data_dir) for task in open_ended}
        blind_stem = evaluator.results_stem(engine.step, [t.name + "-blind" for t in open_ended], blind_settings)
        evaluator.write_results(out_dir, blind_stem, blind, dict(meta, blind=True), metric_of)
        report["evaluation"]["blind_scores"] = {name: {s: r[metric_of[name]] for s, r in per.items()}
                                                for name, per in blind.items()}
        for name, per in report["evaluation"]["blind_scores"].items():
            log(f"[blind] {name}: " + ", ".join(f"{s}-shot {v:.2f} (seeing: "
                                                f"{report['evaluation']['scores'][name].get(s, float('nan')):.2f})"
                                                for s, v in per.items()))
    report["seconds"] = round(time.time() - started, 1)
    with open(os.path.join(workdir, "recipe.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    log(table_path.read_text())
    log(f"results: {json_path} (picture: {report['evaluation']['plot']}); report: "
        f"{os.path.join(workdir, 'recipe.json')}; {report['seconds']:.0f} s")
    return report
