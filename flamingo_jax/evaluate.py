"""Few-shot evaluation of a trained Flamingo.

    python -m flamingo_jax.evaluate --workdir=workdirs/tiny --shots=0,4
    python -m flamingo_jax.evaluate --workdir=gs://.../80b --tasks=coco,vqav2 --shots=0,4,32 --data_dir=/data
    python -m flamingo_jax.evaluate --workdir=... --tasks=coco,imagenet --source=tfds --tfds_data_dir=gs://.../tfds

Restores the latest (or `--step`) orbax checkpoint of the run in `--workdir`
with its frozen backbones, evaluates each task at each shot count (protocol:
flamingo_jax/evaluation/evaluator.py; tasks and the files they expect:
flamingo_jax/evaluation/tasks.py) and writes `<workdir>/eval/step_<N>.<what>.json`
and a Markdown table beside it, `<what>` naming what was evaluated (tasks, shots,
queries, settings: `evaluation/evaluator.py::results_stem`), so a smaller run never
replaces a larger one's results. Without `--data_dir`, a run trained on the
project's synthetic corpus is evaluated on that corpus's held-out tasks. `--source=tfds`
(or per task, `--source=coco=tfds,vqav2=files`) reads the tasks TFDS has from prepared
builders in `--tfds_data_dir` (flamingo_jax/evaluation/tfds_readers.py).
`--prompts=openflamingo` evaluates with OpenFlamingo's prompts, post-processing and
ranking (flamingo_jax/evaluation/openflamingo.py) instead of the paper's;
`--vqa_normalization` chooses how VQA accuracy normalises answers (always, as
EvalAI and OpenFlamingo do, or official); the results JSON's meta records both.
`--blind` is the control that shows a score comes from looking: every image and
video frame of every prompt becomes the task's mean image (the pixel-wise mean of
the support pool's and the queries' images after resizing and normalisation; RICES
sees it too), the task names in the results' file name end in `-blind` and the
meta says `blind: true`.
Videos are fed as `--video_frames` frames (default 30) at `--video_fps` (default 3), as the
paper evaluates, whatever frame count the model trained with.
"""

import dataclasses
import os
import tempfile
import time
from pathlib import Path

from absl import flags, logging

from flamingo_jax import cli

SYNTHETIC_TASKS = "synthetic_captioning,synthetic_vqa,synthetic_classification,synthetic_video_qa"

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir (holds checkpoints/).")
_TASKS = flags.DEFINE_string("tasks", SYNTHETIC_TASKS, "Comma-separated task names (see evaluation/tasks.py).")
_SHOTS = flags.DEFINE_string("shots", "0,4,32", "Comma-separated shot counts.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory with the tasks' annotation files and images "
                                "(default: the run's synthetic corpus).")
_SOURCE = flags.DEFINE_string("source", "files", "Where tasks read their data: 'files' (annotation files under "
                              "--data_dir), 'tfds' (prepared TFDS builders), or per task 'coco=tfds,vqav2=files'.")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "TFDS data dir of the builders (--source=tfds; "
                                     "default: TFDS's own, ~/tensorflow_datasets).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model (default: the run's).")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", None, "Queries per task (default: all of the split).")
_SUPPORT_SIZE = flags.DEFINE_integer("support_size", 2048, "Support pool size (the paper's 2,048).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Prompts per batch.")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", 3, "Beam size for open-ended tasks.")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 0.0, "GNMT length-penalty alpha for beam search.")
_ENSEMBLE = flags.DEFINE_integer("ensemble", 6, "Support-order permutations averaged for ranked tasks.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for query, support and permutation sampling.")
_VIDEO_FRAMES = flags.DEFINE_integer("video_frames", 30, "Frames fed per video (the paper's 30; the model's "
                                     "temporal embeddings are interpolated from its training frame count).")
_VIDEO_FPS = flags.DEFINE_float("video_fps", 3.0, "Rate the video frames are sampled at, when a clip's stored "
                                "rate is known (the paper's 3); 0: evenly over each clip.")
_PROMPTS = flags.DEFINE_enum("prompts", "flamingo", ["flamingo", "openflamingo"],
                             "Prompt wording and post-processing: the paper's (flamingo) or OpenFlamingo's "
                             "open_flamingo/eval (openflamingo: '<image>Output:{caption}<|endofchunk|>', "
                             "'Question:{q} Short answer:{a}', ...), for models trained with OpenFlamingo.")
_VQA_NORMALIZATION = flags.DEFINE_enum("vqa_normalization", "always", ["always", "official"],
                                       "VQA accuracy's answer normalisation: always (default; as the EvalAI "
                                       "server and OpenFlamingo compute it) or official (the VQA API script's "
                                       "quirk: only when the annotators disagree).")
_BLIND = flags.DEFINE_bool("blind", False, "The control for looking: every image and video frame of every prompt "
                           "(support and query) replaced by the task's mean image (the pixel-wise mean of its "
                           "evaluated images as the model sees them; RICES sees it too). Results are tagged -blind.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results go (default: <workdir>/eval).")


def main(argv):
    del argv
    from flamingo_jax import runtime
    from flamingo_jax.errors import UserError
    from flamingo_jax.evaluation import evaluator, tfds_readers
    from flamingo_jax.evaluation.tasks import get_task, with_protocol
    from flamingo_jax.inference.engine import Engine
    from flamingo_jax.inference.loading import workdir_path

    runtime.quiet_library_logs()
    runtime.enable_compilation_cache()
    settings = evaluator.EvalSettings(
        shots=evaluator.parse_ints(_SHOTS.value), num_queries=_NUM_QUERIES.value, support_size=_SUPPORT_SIZE.value,
        batch_size=_BATCH_SIZE.value, num_beams=_NUM_BEAMS.value, length_penalty=_LENGTH_PENALTY.value,
        ensemble=_ENSEMBLE.value, seed=_SEED.value, video_frames=_VIDEO_FRAMES.value, video_fps=_VIDEO_FPS.value)
    tasks = [with_protocol(get_task(name.strip()), prompts=_PROMPTS.value, vqa_normalization=_VQA_NORMALIZATION.value)
             for name in _TASKS.value.split(",") if name.strip()]  # unknown names fail here
    if not tasks:
        raise UserError(f"--tasks={_TASKS.value!r} names no task; give comma-separated names such as "
                        f"{SYNTHETIC_TASKS}.")
    sources = tfds_readers.parse_sources(_SOURCE.value, [task.name for task in tasks])
    from_tfds = [name for name, source in sources.items() if source == "tfds"]
    missing = [name for name in from_tfds if name not in tfds_readers.BENCHMARKS]
    if missing:  # before the checkpoint is loaded
        raise UserError(f"--source: task(s) {missing} have no TFDS source (TFDS has "
                        f"{sorted(tfds_readers.BENCHMARKS)}); read them from files, per task: "
                        f"--source={missing[0]}=files,<task>=tfds.")
    tfds_readers.check_tfds_dir(_TFDS_DATA_DIR.value or "")
    engine = Engine.from_workdir(_WORKDIR.value, step=_STEP.value, tokenizer_path=_TOKENIZER.value)
    step = engine.step
    data_dir = _DATA_DIR.value or engine.run_config.synthetic.get("out_dir") or ""
    if not data_dir and len(from_tfds) < len(tasks):
        raise UserError("--data_dir is required: the run did not train on the synthetic corpus.")
    logging.info("evaluating step %d of %s on %s", step, _WORKDIR.value, ", ".join(t.name for t in tasks))
    runner = evaluator.Evaluator(engine, settings, blind=_BLIND.value)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="flamingo_tfds_images_") as cache:
        tasks = [dataclasses.replace(task, load=tfds_readers.tfds_loader(
                     task.name, _TFDS_DATA_DIR.value or "", Path(cache), support_size=settings.support_size,
                     num_queries=settings.num_queries, seed=settings.seed)) if sources[task.name] == "tfds" else task
                 for task in tasks]
        results = {task.name: runner.evaluate(task, Path(data_dir)) for task in tasks}
    workdir = workdir_path(_WORKDIR.value)
    meta = dict(workdir=str(workdir), step=step, data_dir=os.path.abspath(data_dir) if data_dir else None,
                sources=sources, tfds_data_dir=_TFDS_DATA_DIR.value if from_tfds else None,
                settings=dataclasses.asdict(settings), prompts=_PROMPTS.value,
                vqa_normalization=_VQA_NORMALIZATION.value, blind=_BLIND.value, seconds=round(time.time() - started, 1))
    out_dir = workdir_path(_OUTPUT_DIR.value) if _OUTPUT_DIR.value else workdir / "eval"
    metric_of = {task.name: task.primary_metric for task in tasks}
    # a task read from TFDS writes beside, not over, its annotation-file results
    # so do other prompts, the official VQA normalisation and a blind run (the defaults keep their names)
    def tagged(task) -> str:
        return (task.name + ("-tfds" if sources[task.name] == "tfds" else "")
                + ("-openflamingo" if _PROMPTS.value == "openflamingo" else "")
                + ("-official" if _VQA_NORMALIZATION.value == "official" and task.primary_metric == "vqa_accuracy"
                   else "")
                + ("-blind" if _BLIND.value else ""))
    stem = evaluator.results_stem(step, [tagged(t) for t in tasks], settings)
    json_path, table_path = evaluator.write_results(out_dir, stem, results, meta, metric_of)
    print(table_path.read_text())
    logging.info("results: %s and %s", json_path, table_path)


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    cli.run(main)
