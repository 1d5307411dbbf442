"""The recipe (`flamingo_jax.evaluation.recipe`, the `python -m flamingo_jax.recipe` CLI) end to end at the smallest size: both pretraining stages, Flamingo
over their exports, the backbone checks and the few-shot evaluation, its report and pictures; a
second run skips the finished pretraining; a config file without stages is refused clearly."""

import os
import shutil

import pytest
from conftest import NOTEBOOK_TASKS as TASKS
from test_pretraining import pretraining_config

from flamingo_jax.core.checkpoint import Checkpointer
from flamingo_jax.errors import UserError
from flamingo_jax.evaluation import recipe

from helpers import train_config


def stage_configs(corpus: str) -> dict:
    configs = {"contrastive": pretraining_config(corpus, "contrastive", ("image_text",), steps=2),
               "lm": pretraining_config(corpus, "lm", ("interleaved", "image_text"), steps=2),
               "flamingo": train_config(corpus, steps=2)}
    configs["flamingo"].model.decoder.max_len = 512  # room for a 1-shot prompt
    for config in configs.values():
        config.synthetic.out_dir = corpus  # the corpus is there (its manifest), so nothing is generated
        config.checkpoint.async_save = False
    return configs


def test_recipe_runs_every_stage_once_then_skips_the_finished_pretraining(notebook_recipe_run, synthetic_corpus,
                                                                           tmp_path):
    """The session's run (the notebook's recipe cell: `python -m flamingo_jax.recipe` from
    scratch) trained every stage over the previous one's exports and wrote the report; run
    again on a copy of its workdir, the recipe skips the finished pretraining."""
    source, written = notebook_recipe_run["workdir"], notebook_recipe_run["report"]
    assert {stage: r["steps"] for stage, r in written["stages"].items()} == {"contrastive": 2, "lm": 2, "flamingo": 2}
    exports = {"vision": os.path.join(source, "contrastive", "backbones", "vision"),
               "decoder": os.path.join(source, "lm", "backbones", "decoder")}
    assert all(os.path.isdir(path) for path in exports.values())
    checkpointer = Checkpointer(os.path.join(os.path.abspath(source), "flamingo", "checkpoints"), async_save=False)
    try:
        recorded = checkpointer.read_meta(checkpointer.latest_step())["backbones"]
    finally:
        checkpointer.close()
    assert {name: os.path.realpath(path) for name, path in recorded.items()} == {
        name: os.path.realpath(path) for name, path in exports.items()}

    retrieval, lm = written["checks"]["vision_retrieval"], written["checks"]["lm_perplexity"]
    assert retrieval["num_pairs"] == 100 and 0 <= retrieval["recall_at_1"] <= retrieval["recall_at_5"] <= 100
    assert lm["perplexity"] > 1 and lm["random_init_perplexity"] > 1 and lm["num_tokens"] > 0
    dependence = written["checks"]["image_dependence"]
    assert dependence["num_pairs"] == 100
    assert all(0 < dependence[k] < 20 for k in ("real", "shuffled", "blank"))
    assert set(written["evaluation"]["scores"]) == set(TASKS)
    assert all(set(per_shot) == {"0", "1"} for per_shot in written["evaluation"]["scores"].values())
    # the blind control (--blind_shots=1) covers the open-ended tasks only (ranking a mean image is not a control)
    assert set(written["evaluation"]["blind_scores"]) == {"synthetic_captioning", "synthetic_vqa"}
    assert all(set(per_shot) == {"1"} for per_shot in written["evaluation"]["blind_scores"].values())
    for stage in recipe.STAGES:
        assert os.path.isfile(os.path.join(source, stage, "training.png")), stage
    assert os.path.isfile(written["evaluation"]["plot"]) and written["evaluation"]["plot"].endswith(".png")

    workdir = str(tmp_path / "recipe")
    shutil.copytree(source, workdir)
    lines = []
    again = recipe.run(stage_configs(synthetic_corpus), workdir, shots=(0,),
                       num_queries=1, tasks=("synthetic_vqa",), blind_shots=(), log=lines.append)
    assert set(again["stages"]) == {"flamingo"}  # resumed at its last step: nothing left to train
    assert again["stages"]["flamingo"]["steps"] == 2
    assert sum("skipped" in line for line in lines) == 2


def test_a_config_file_without_stages_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "stageless.py"
    path.write_text("import ml_collections\n\n\ndef get_config():\n    return ml_collections.ConfigDict()\n")
    with pytest.raises(UserError, match=r"stageless\.py: its get_config\(stage\) must accept each of"):
        recipe.load_stage_configs(str(path))
    with pytest.raises(UserError, match="no such file"):
        recipe.load_stage_configs(str(tmp_path / "missing.py"))


def test_caption_loss_by_image_is_the_same_for_any_image_exactly_when_the_gates_are_shut(synthetic_corpus):
    """At initialisation (tanh gates at 0) the images cannot matter: the three losses are equal. With
    the attention gates open, another pair's image or a blank one changes the loss."""
    import jax
    import jax.numpy as jnp

    from flamingo_jax.core.config import RunConfig
    from flamingo_jax.core.parts import ModelParts
    from flamingo_jax.evaluation.image_dependence import caption_loss_by_image

    config = train_config(synthetic_corpus, steps=1)
    config.synthetic.out_dir = synthetic_corpus  # its validation split
    run = RunConfig.from_config(config)
    parts = ModelParts.flamingo(run.model)
    params, frozen = jax.jit(lambda: parts.init(0))()
    shut = caption_loss_by_image(parts.merge(params, frozen), run, max_pairs=8)
    assert shut["num_pairs"] == 8 and shut["real"] == shut["shuffled"] == shut["blank"] > 0
    params["xattn"]["attention_gate"] = jnp.ones_like(params["xattn"]["attention_gate"])
    opened = caption_loss_by_image(parts.merge(params, frozen), run, max_pairs=8)
    assert opened["real"] != opened["shuffled"] and opened["real"] != opened["blank"]
