"""`python -m flamingo_jax.convert openflamingo` and `to-openflamingo` end to end: OpenFlamingo's
own `Flamingo` (a tiny open_clip ViT and a tiny MPT, GPT-NeoX or LLaMA from transformers, random
weights, gates opened), its checkpoint saved as its training script saves it, the HF decoder,
open_clip weights and a tokenizer.json on disk; the CLI's workdir loaded by `Engine.from_workdir`
gives its logits, exports back into a fresh OpenFlamingo, fine-tunes, and bad inputs are refused
with one line and no output. Run with -s to see the max abs errors."""

from __future__ import annotations

import json
import os

os.environ.setdefault("USE_TF", "0")
import jax
import numpy as np
import pytest
import torch
import torchvision_cpu  # noqa: F401  (before transformers / open_clip import torchvision)
from flax import nnx

import openflamingo_case as case
from helpers import assert_nothing_written, run_convert
from openflamingo_case import B, M, T

VIS, LM, VOCAB = 16, 24, 40
# family -> (--arch, LM layers, OpenFlamingo's cadence, HF embedding rows: padded beyond the tokenizer's)
FAMILIES = {"mpt": ("of-3b", 2, 1, 48), "gpt_neox": ("of-4b", 4, 2, 48), "llama": ("of-9b-v1", 4, 4, VOCAB)}


def word_tokenizer(directory, size: int) -> str:
    """A word-level tokenizer.json with exactly `size` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, size)}}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    return str(directory)


def hf_decoder(family: str, layers: int, rows: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MptConfig, MptForCausalLM

    if family == "mpt":
        return MptForCausalLM(MptConfig(d_model=LM, n_heads=2, n_layers=layers, expansion_ratio=2, vocab_size=rows,
                                        max_seq_len=64))
    if family == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=rows, hidden_size=LM, num_hidden_layers=layers,
                                                num_attention_heads=2, intermediate_size=48, rotary_pct=0.5,
                                                max_position_embeddings=64, tie_word_embeddings=False))
    return LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=LM, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, max_position_embeddings=64, tie_word_embeddings=False))


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """What OpenFlamingo's train script saves (train_utils.filter_state_dict_to_trainable, which
    imports wandb): every trainable weight and every embedding, without the `gated_cross_attn_layers`
    list (its FlamingoLayer aliases stay), `old_decoder_blocks` or the vision tower."""
    state = model.state_dict()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad and "embed" not in n}
    return {n: v for n, v in state.items() if n not in frozen and not any(
        part in n for part in ("lang_encoder.old_decoder_blocks", "lang_encoder.gated_cross_attn_layers",
                               "vision_encoder"))}


def build_openflamingo(family: str, root, *, vocab: int = VOCAB, image_size: int = 16, seed: int = 0):
    """OpenFlamingo's Flamingo as its factory assembles it (without downloads), gates opened,
    and on disk what `convert openflamingo` reads: checkpoint.pt, the HF decoder, the open_clip
    tower (with open_clip_config.json) and tokenizer.json."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower
    from open_flamingo import Flamingo as OpenFlamingo
    from open_flamingo.src.factory import _infer_decoder_layers_attr_name
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance

    _, layers, every, rows = FAMILIES[family]
    rows = max(rows, vocab)
    torch.manual_seed(seed)
    vision = torch.nn.Module()
    vision.visual = _build_vision_tower(8, CLIPVisionCfg(layers=1, width=VIS, head_width=8, patch_size=8,
                                                         image_size=image_size))
    vision.visual.output_tokens = True
    (root / "vision").mkdir(parents=True)
    torch.save({f"visual.{k}": v for k, v in vision.visual.state_dict().items()}, root / "vision" / "clip.pt")
    (root / "vision" / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "vision_cfg": {"width": VIS, "head_width": 8, "layers": 1, "patch_size": 8, "image_size": image_size},
        "quick_gelu": False}}))
    lm = hf_decoder(family, layers, rows)
    lm.save_pretrained(root / "lm")  # safetensors
    tokenizer = word_tokenizer(root / "tokenizer", vocab)
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name(_infer_decoder_layers_attr_name(lm))
    lm.resize_token_embeddings(vocab + 3)  # + <|endofchunk|>, <image>, <PAD>
    model = OpenFlamingo(vision, lm, vocab, vocab + 1, vis_dim=VIS, cross_attn_every_n_layers=every).eval()
    with torch.no_grad():
        for block in model.lang_encoder.gated_cross_attn_layers:
            if block is not None:
                block.attn_gate.uniform_(0.3, 1.0)
                block.ff_gate.uniform_(-1.0, -0.3)
    model.requires_grad_(False)  # the factory's trainable set
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    if family == "llama":  # torch.save(model.state_dict()): everything, the list and the untied lm_head included
        torch.save(model.state_dict(), root / "checkpoint.pt")
    else:  # the train script's {'model_state_dict': filtered}
        torch.save({"model_state_dict": trainable_state_dict(model), "epoch": 0}, root / "checkpoint.pt")
    return model, tokenizer


def convert_flags(root, tokenizer, arch, out):
    return ["openflamingo", f"--checkpoint={root / 'checkpoint.pt'}", f"--lm={root / 'lm'}",
            f"--vision={root / 'vision'}", f"--tokenizer={tokenizer}", f"--arch={arch}", f"--out={out}",
            "--precision=float32"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"of_{family}")
    reference, tokenizer = build_openflamingo(family, root)
    out = root / "workdir"
    assert run_convert(*convert_flags(root, tokenizer, FAMILIES[family][0], out)) == 0
    return family, root, reference, out


def test_converted_workdir_gives_openflamingo_logits(converted):
    from flamingo_jax.inference.engine import Engine

    family, _, reference, out = converted
    assert not [p for p in os.listdir(out.parent) if p.startswith(".")]  # no staging left behind
    engine = Engine.from_workdir(str(out))
    assert engine.step == 0 and engine.tokenizer.vocab_size == VOCAB
    model = engine.model
    ids, valid, pixels = case.inputs(VOCAB, 16)
    expected = case.reference_logits(reference, ids, valid, pixels)
    got = case.our_logits(model, ids, valid, pixels, VOCAB + 1)
    assert got.shape == expected.shape == (B, T, VOCAB + 3)
    error = float(np.abs(got - expected)[valid].max())
    print(f"convert openflamingo ({family}): max abs logit error {error:.2e}")  # shown with -s
    assert error < 1e-4, error


def test_to_openflamingo_round_trips_into_a_fresh_openflamingo(converted, tmp_path):
    family, _, reference, out = converted
    exported = tmp_path / "exported.pt"
    assert run_convert("to-openflamingo", f"--workdir={out}", f"--out={exported}") == 0
    fresh, _ = build_openflamingo(family, tmp_path / "fresh", seed=1)  # other random trainable weights
    rng = np.random.default_rng(9)
    ids = torch.from_numpy(case.token_ids(rng, VOCAB))
    pixels = torch.from_numpy(rng.standard_normal((B, M, 1, 3, 16, 16)).astype(np.float32))
    # The frozen towers are the original's (OpenFlamingo reloads them from the same pretrained files).
    trained = ("perceiver.", "lang_encoder.gated_cross_attn", "embed", "wte.", "lm_head.")
    fresh.load_state_dict({n: v for n, v in reference.state_dict().items()
                           if n.startswith("vision_encoder.") or not any(p in n for p in trained)}, strict=False)
    with torch.no_grad():
        before = reference(pixels, ids).logits
        assert float((fresh(pixels, ids).logits - before).abs().max()) > 1e-2
    result = fresh.load_state_dict(torch.load(exported, weights_only=True), strict=False)
    assert not result.unexpected_keys
    with torch.no_grad():
        after = fresh(pixels, ids).logits
    error = float((after - before).abs().max())
    print(f"to-openflamingo round trip ({family}): max abs logit error {error:.2e}")  # shown with -s
    assert error < 1e-5, error


def load_config_file(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("converted_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def mpt_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("of_bad")
    model, tokenizer = build_openflamingo("mpt", root)
    return root, model, tokenizer


def test_a_checkpoint_of_another_cadence_is_refused(mpt_sources, tmp_path, capsys):
    root, _, tokenizer = mpt_sources  # xattn before every layer (of-3b)
    out = tmp_path / "workdir"
    assert run_convert(*convert_flags(root, tokenizer, "of-4b", out)) == 1
    message = capsys.readouterr().err.strip()
    assert "gated xattn blocks before LM layers [0, 1] but --arch=of-4b places them before [1]" in message
    assert len(message.splitlines()) == 1, message
    assert_nothing_written(str(out))


def test_a_missing_tensor_is_named(mpt_sources, tmp_path, capsys):
    root, _, tokenizer = mpt_sources
    state = torch.load(root / "checkpoint.pt", weights_only=True)["model_state_dict"]
    del state["perceiver.layers.2.0.to_kv.weight"]
    (tmp_path / "lm").symlink_to(root / "lm")
    (tmp_path / "vision").symlink_to(root / "vision")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "checkpoint.pt")  # plain, DDP-prefixed
    out = tmp_path / "workdir"
    assert run_convert(*convert_flags(tmp_path, tokenizer, "of-3b", out)) == 1
    message = capsys.readouterr().err
    assert "perceiver.layers.2.0.to_kv.weight" in message and "Nothing was written" in message, message
    assert "module." not in message  # the prefix was stripped: only the deleted tensor is missing
    assert_nothing_written(str(out))


def test_a_tokenizer_of_the_wrong_size_is_refused(mpt_sources, tmp_path, capsys):
    root, _, _ = mpt_sources
    tokenizer = word_tokenizer(tmp_path / "tokenizer", VOCAB - 5)
    out = tmp_path / "workdir"
    assert run_convert(*convert_flags(root, tokenizer, "of-3b", out)) == 1
    message = capsys.readouterr().err.strip()
    assert f"has {VOCAB - 5} tokens but the checkpoint's lang_encoder.transformer.wte.weight has {VOCAB + 3} rows" \
        in message
    assert len(message.splitlines()) == 1, message
    assert_nothing_written(str(out))


def test_a_converted_model_fine_tunes_in_its_workdir(synthetic_corpus, tmp_path, run_cli):
    """`python -m flamingo_jax.train --workdir=<converted> --config=<its config.py with the synthetic
    corpus as data>` resumes step 0: the loss falls, the trainable weights move, the frozen ones
    are the converted ones; then `python -m flamingo_jax.evaluate` reads it."""
    import ml_collections

    from flamingo_jax.core.checkpoint import Checkpointer
    from flamingo_jax.data.tokenizer import load_tokenizer
    from flamingo_jax.inference.loading import load_trained

    from helpers import train_config

    spm = os.path.join(synthetic_corpus, "spm.model")
    vocab = load_tokenizer(spm).vocab_size
    build_openflamingo("mpt", tmp_path, vocab=vocab, image_size=32)
    out = tmp_path / "workdir"
    assert run_convert(*convert_flags(tmp_path, str(tmp_path / "tokenizer"), "of-3b", out)) == 0
    before = load_trained(str(out))
    checkpointer = Checkpointer(str(out / "checkpoints"), async_save=False)
    recorded = checkpointer.read_meta(0)["config"]
    checkpointer.close()
    config = load_config_file(out / "config.py")  # what `train --config=<workdir>/config.py` reads
    assert config.to_dict() == ml_collections.ConfigDict(recorded).to_dict()
    data = train_config(synthetic_corpus, datasets=("interleaved",), steps=4)
    fine_tune = tmp_path / "fine_tune.py"  # the converted config with the synthetic corpus as its data
    fine_tune.write_text(
        "import importlib.util, json\nimport ml_collections\n\n\ndef get_config():\n"
        f"    spec = importlib.util.spec_from_file_location('converted', {str(out / 'config.py')!r})\n"
        "    module = importlib.util.module_from_spec(spec)\n    spec.loader.exec_module(module)\n"
        "    config = module.get_config()\n"
        f"    config.data = ml_collections.ConfigDict(json.loads({json.dumps(data.data.to_dict())!r}))\n"
        f"    config.train.update(json.loads({json.dumps(data.train.to_dict())!r}))\n"
        "    config.train.learning_rate = 3e-3\n"
        "    config.checkpoint.update(every_steps=1000, keep=2, async_save=False)\n"
        "    return config\n")
    done = run_cli("flamingo_jax.train", f"--config={fine_tune}", f"--workdir={out}", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting from the converted weights of step 0" in done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records}
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses[4] < losses[1], losses
    after = load_trained(str(out))
    assert after.step == 4
    frozen = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))
    for a, b in zip(jax.tree.leaves(frozen(before.model)), jax.tree.leaves(frozen(after.model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree.leaves(nnx.to_pure_dict(nnx.state(before.model, nnx.Param))),
        jax.tree.leaves(nnx.to_pure_dict(nnx.state(after.model, nnx.Param))))]
    assert all(moved)
    # The fine-tuned step exports for OpenFlamingo.
    assert run_convert("to-openflamingo", f"--workdir={out}", f"--out={tmp_path / 'tuned.pt'}") == 0
    tuned = torch.load(tmp_path / "tuned.pt", weights_only=True)
    np.testing.assert_array_equal(tuned["perceiver.latents"].numpy(), np.asarray(after.model.resampler.latents[...]))
    # ... and `python -m flamingo_jax.evaluate` reads the workdir (synthetic held-out tasks, 0 shots).
    done = run_cli("flamingo_jax.evaluate", f"--workdir={out}", f"--data_dir={synthetic_corpus}",
                   "--tasks=synthetic_captioning", "--shots=0", "--num_queries=2", "--batch_size=2", "--ensemble=1",
                   "--num_beams=1", f"--output_dir={tmp_path / 'eval'}", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = (tmp_path / "eval").glob("step_4.*.json")
    assert json.loads(results.read_text())


def test_an_existing_workdir_is_kept_unless_overwrite(mpt_sources, tmp_path, capsys):
    root, _, tokenizer = mpt_sources
    out = tmp_path / "workdir"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert run_convert(*convert_flags(root, tokenizer, "of-3b", out)) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep"
    assert run_convert(*convert_flags(root, tokenizer, "of-3b", out), "--overwrite") == 0
    assert not (out / "mine.txt").exists() and (out / "checkpoints").is_dir()
    assert [e for e in os.listdir(tmp_path) if e != "workdir"] == []  # nothing staged or set aside is left


def hf_clip_from_open_clip(visual, directory, image_size: int = 16) -> None:
    """OpenFlamingo's open_clip tower as a Hugging Face CLIPVisionModel with the same weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=VIS, intermediate_size=4 * VIS, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=image_size, patch_size=8,
                                          hidden_act="gelu", layer_norm_eps=1e-5))
    ours = visual.state_dict()
    state = {"embeddings.patch_embedding.weight": ours["conv1.weight"],
             "embeddings.class_embedding": ours["class_embedding"],
             "embeddings.position_embedding.weight": ours["positional_embedding"]}
    for theirs, name in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        state.update({f"{theirs}.{p}": ours[f"{name}.{p}"] for p in ("weight", "bias")})
    block, layer = "transformer.resblocks.0", "encoder.layers.0"
    for p in ("weight", "bias"):
        for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{layer}.self_attn.{name}.{p}"] = ours[f"{block}.attn.in_proj_{p}"].chunk(3)[part]
        state.update({f"{layer}.self_attn.out_proj.{p}": ours[f"{block}.attn.out_proj.{p}"],
                      f"{layer}.layer_norm1.{p}": ours[f"{block}.ln_1.{p}"],
                      f"{layer}.layer_norm2.{p}": ours[f"{block}.ln_2.{p}"],
                      f"{layer}.mlp.fc1.{p}": ours[f"{block}.mlp.c_fc.{p}"],
                      f"{layer}.mlp.fc2.{p}": ours[f"{block}.mlp.c_proj.{p}"]})
    missing, unexpected = hf.vision_model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in name for name in missing), (missing, unexpected)
    hf.save_pretrained(directory)


def test_a_hugging_face_clip_tower_gives_the_same_logits(mpt_sources, tmp_path):
    """--vision as a Hugging Face CLIP directory: its tokens are taken ln_post'd, as OpenFlamingo's."""
    from flamingo_jax.inference.engine import Engine

    root, reference, tokenizer = mpt_sources
    hf_clip_from_open_clip(reference.vision_encoder, tmp_path / "clip")
    out = tmp_path / "workdir"
    flags = [f"--vision={tmp_path / 'clip'}" if f.startswith("--vision=") else f
             for f in convert_flags(root, tokenizer, "of-3b", out)]
    assert run_convert(*flags) == 0
    engine = Engine.from_workdir(str(out))
    ids, valid, pixels = case.inputs(VOCAB, 16)
    expected = case.reference_logits(reference, ids, valid, pixels)
    got = case.our_logits(engine.model, ids, valid, pixels, VOCAB + 1)
    error = float(np.abs(got - expected)[valid].max())
    print(f"convert openflamingo (mpt, HF CLIP tower): max abs logit error {error:.2e}")  # shown with -s
    assert error < 1e-4, error
