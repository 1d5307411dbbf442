"""The paper's recipe in miniature: pretrain both backbones, train Flamingo on them frozen, then
evaluate few-shot (the README's main job).

    python -m flamingo_jax.recipe --config=configs/tiny.py --workdir=workdirs/tiny

The config file's `get_config(stage)` gives each stage's run config; each stage is an ordinary
training run that `python -m flamingo_jax.train --config=configs/tiny.py:<stage>` runs alone:

  1. <workdir>/contrastive  the vision encoder and a text encoder, contrastively (appendix B.1.3)
  2. <workdir>/lm           the decoder, next-token NLL on the corpus' text
  3. <workdir>/flamingo     Flamingo over both, frozen (`config.backbones` = 1 and 2's exports)

A pretraining stage whose exported backbone exists is skipped; an interrupted stage resumes (the
trainer's own resume). Then the backbones' own checks (image-to-text recall@1 on held-out pairs;
held-out perplexity against the random LM's) and few-shot evaluation of the Flamingo run at
--shots on the corpus' held-out tasks. Everything measured goes to <workdir>/recipe.json; the
evaluation writes its table, JSON and score-against-shots PNG to <workdir>/flamingo/eval/, each
training run its loss (and gate) curves to <workdir>/<stage>/training.png.
"""

import sys

from absl import flags, logging

from flamingo_jax import cli

_CONFIG = flags.DEFINE_string("config", "configs/tiny.py", "Config file whose get_config(stage) gives each "
                              "stage's run config (contrastive, lm, flamingo).")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/tiny", "One sub-directory per stage goes here.")
_SHOTS = flags.DEFINE_string("shots", "0,4,8", "Comma-separated shot counts (video QA: 0 and 4 of them).")
_TASKS = flags.DEFINE_string("tasks", "synthetic_captioning,synthetic_vqa,synthetic_classification,synthetic_video_qa",
                             "Comma-separated held-out tasks.")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", None, "Queries per task (default: all of the split).")
_BLIND_SHOTS = flags.DEFINE_string("blind_shots", "4", "Comma-separated shot counts of the blind control "
                                   "(captioning and VQA shown only the mean image); empty: none.")


def main(argv):
    del argv
    from flamingo_jax import runtime
    from flamingo_jax.evaluation import evaluator, recipe

    runtime.quiet_library_logs()
    runtime.enable_compilation_cache()
    shots = evaluator.parse_ints(_SHOTS.value)
    blind_shots = evaluator.parse_ints(_BLIND_SHOTS.value, "blind_shots") if _BLIND_SHOTS.value.strip() else ()
    tasks = tuple(name.strip() for name in _TASKS.value.split(",") if name.strip())
    configs = recipe.load_stage_configs(_CONFIG.value)
    logging.set_verbosity(logging.WARNING)  # the stages' progress lines are the trainer's warnings-free INFO
    recipe.run(configs, _WORKDIR.value, shots=shots, tasks=tasks, num_queries=_NUM_QUERIES.value,
               blind_shots=blind_shots, log=lambda line: print(line, flush=True, file=sys.stdout))


if __name__ == "__main__":
    cli.run(main)
