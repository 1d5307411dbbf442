"""What a training run optimises: Flamingo, or the pretraining of one of its frozen backbones.

The paper's recipe has three stages, and the same trainer runs each (`config.objective`):

* 'contrastive' (appendix B.1.3): the vision encoder and a BERT-style text encoder, trained
  on image-text (and video-text) pairs with the two-term contrastive loss, a learnable
  inverse temperature and label smoothing; exports the vision encoder.
* 'lm': the decoder, trained on the corpus' text with next-token NLL; exports the decoder.
* 'flamingo' (appendix B.1.2): Resampler, GATED XATTN-DENSE blocks and new-token rows over
  the frozen backbones, next-token NLL on text tokens only.

An `Objective` says which model a run builds and which of its weights train, the loss of
one batch, the metrics of the weights, the optimizer's clipping, and what the run exports
as backbone checkpoints. The Trainer owns everything else (config checks, mesh and
shardings, state, the accumulated update, checkpoints, SIGTERM, metrics).

A batch's loss is a sum over its examples (or tokens) with a count: the step adds both over
micro-batches and divides at the end, so a micro-batched update equals the full batch's.
"""

from __future__ import annotations

import abc
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flamingo_jax.core import flops
from flamingo_jax.core.config import PAPER_WEIGHT_DECAY_EXEMPT, RunConfig
from flamingo_jax.core.parts import ALL_WEIGHTS, ModelParts
from flamingo_jax.data import repeats
from flamingo_jax.errors import UserError
from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.models.decoder import Decoder
from flamingo_jax.models.dual_encoder import DualEncoder
from flamingo_jax.training.loss import unembedded_nll_sum
from flamingo_jax.training.optimizer import adamw, learning_rate_schedule, make_optimizer

Array = jax.Array
Batch = Mapping[str, Array]


class ObjectiveError(UserError, ValueError):
    """A run config that the chosen objective cannot train."""


class BatchLoss(NamedTuple):
    """A batch's summed loss, what it sums over, and summed metrics (divided by `count` too)."""

    total: Array  # float32 []
    count: Array  # float32 []
    metrics: dict[str, Array]


class Objective(abc.ABC):
    name: str = ""
    exports: tuple[str, ...] = ()  # backbone components written at the end (core.backbones.COMPONENTS)
    trains_resampler = False

    def __init__(self, run: RunConfig, tokenizer: Any = None):
        self.run = run
        self.tokenizer = tokenizer  # data.tokenizer.Tokenizer of the run's data, when it has one

    @abc.abstractmethod
    def parts(self) -> ModelParts:
        """The model this objective trains, split into trainable and frozen weights."""

    @abc.abstractmethod
    def batch_loss(self, model: nnx.Module, batch: Batch) -> BatchLoss:
        """The loss of one (micro-)batch of one dataset."""

    def check(self, batch_kinds: Mapping[str, str]) -> None:
        """Fails before compiling when the data (dataset name -> kind) or config cannot work."""

    def weight_metrics(self, params: Any) -> dict[str, Array]:
        """Metrics of the trainable weights logged every step (e.g. Flamingo's tanh gates)."""
        return {}

    def step_flops(self, shapes: Mapping[str, flops.BatchShape], num_microbatches: int = 1) -> Any:
        """Analytic FLOPs of one step over these batches (a `core.flops` count with `.model` and
        `.total`), or None where the objective has no count (MFU is then not logged)."""
        return None

    def weight_decay_exempt(self) -> tuple[str, ...]:
        """`train.weight_decay_exempt`, whose default (the paper's Resampler) a model without a
        Resampler (the pretraining objectives') reads as exempting nothing."""
        exempt = self.run.train.weight_decay_exempt
        return () if exempt == PAPER_WEIGHT_DECAY_EXEMPT and not self.trains_resampler else exempt

    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.run.train, self.weight_decay_exempt())

    def export(self, params: Any, frozen: Any) -> dict[str, Any]:
        """{component: weights as the Flamingo frozen layout expects them} for `exports`."""
        return {}


class FlamingoObjective(Objective):
    """Appendix B.1.2: per dataset, the mean next-token NLL over text tokens (and <EOC>)."""

    name = "flamingo"
    trains_resampler = True

    @classmethod
    def for_model(cls, model: FlamingoConfig) -> "FlamingoObjective":
        """The objective of a run whose other settings are the defaults (benchmarks, tests)."""
        return cls(RunConfig(model=model))

    def parts(self) -> ModelParts:
        return ModelParts.flamingo(self.run.model)

    def check(self, batch_kinds: Mapping[str, str]) -> None:
        textual = {name: kind for name, kind in batch_kinds.items() if kind == repeats.KIND}
        if textual:
            raise ObjectiveError(f"objective 'flamingo' trains on media with text; datasets {textual} are text "
                                 "alone (copying drills for LM pretraining). Remove them from config.data.datasets.")

    def step_flops(self, shapes: Mapping[str, flops.BatchShape],
                   num_microbatches: int = 1) -> flops.StepFlops | None:
        if not self.run.model.freeze_lm:
            return None  # the count models the paper's frozen LM (no weight gradients)
        return flops.step_flops(self.run.model, shapes, num_microbatches)

    def batch_loss(self, model, batch: Batch) -> BatchLoss:
        hidden = model.final_hidden(batch["tokens"], batch["media"], batch["media_index"])
        return BatchLoss(unembedded_nll_sum(hidden, model.output_embeddings(), batch["targets"], batch["loss_mask"]),
                         jnp.sum(batch["loss_mask"].astype(jnp.float32)), {})

    def weight_metrics(self, params: Any) -> dict[str, Array]:
        xattn = params["xattn"]
        return {"gates/attention": jnp.tanh(xattn["attention_gate"]), "gates/ffw": jnp.tanh(xattn["ffw_gate"])}


class LanguageModelObjective(Objective):
    """Text pretraining of the decoder Flamingo will freeze: next-token NLL on the corpus' text.

    The data are the mixture's datasets read as text: their tokens, with the image markers
    masked out of the loss as in Flamingo training; `<EOC>` and other new tokens (ids >=
    vocab_size) do not exist for the bare LM, so they are read as padding and never targets."""

    name = "lm"
    exports = ("decoder",)

    def parts(self) -> ModelParts:
        cfg = self.run.model
        dtype, _, param_dtype = cfg.dtypes()
        return ModelParts(lambda rngs: Decoder(cfg.decoder, dtype=dtype, param_dtype=param_dtype,
                                               remat_policy=cfg.remat_policy, attention_implementation=cfg.attention,
                                               rngs=rngs),
                          trainable=ALL_WEIGHTS)

    def batch_loss(self, model, batch: Batch) -> BatchLoss:
        vocab = self.run.model.decoder.vocab_size
        tokens, targets = batch["tokens"], batch["targets"]
        mask = batch["loss_mask"].astype(jnp.float32) * (targets < vocab)
        hidden = model.final_hidden(jnp.where(tokens < vocab, tokens, 0), valid=tokens < vocab)
        nll = unembedded_nll_sum(hidden, (model.output_embedding(),), jnp.where(targets < vocab, targets, 0), mask)
        return BatchLoss(nll, jnp.sum(mask), {})

    def export(self, params: Any, frozen: Any) -> dict[str, Any]:
        return {"decoder": _cast(params, self.run.model.dtypes()[1])}


class ContrastiveObjective(Objective):
    """Appendix B.1.3: image (or video, frames pooled) and text embeddings, L2-normalised, their
    cosine similarities times a learnable inverse temperature; the loss is the mean of the
    image->text and text->image cross-entropies with label smoothing. Every other example of a
    dataset's batch is a negative, so a batch is not split into micro-batches."""

    name = "contrastive"
    exports = ("vision",)

    def parts(self) -> ModelParts:
        run = self.run
        cfg = run.contrastive
        return ModelParts(lambda rngs: DualEncoder(run.model, cfg.text, run.model.total_vocab,
                                                   initial_inverse_temperature=cfg.initial_inverse_temperature,
                                                   rngs=rngs),
                          trainable=ALL_WEIGHTS)

    def check(self, batch_kinds: Mapping[str, str]) -> None:
        wrong = {name: kind for name, kind in batch_kinds.items() if kind not in ("image_text", "video_text")}
        if wrong:
            raise ObjectiveError(f"objective 'contrastive' trains on image-text and video-text pairs; datasets "
                                 f"{wrong} are not pairs. Remove them from config.data.datasets.")
        if self.run.train.microbatches != 1:
            raise ObjectiveError(f"config field `train.microbatches` = {self.run.train.microbatches}: the contrastive "
                                 "loss contrasts every pair of a batch with all the others, so a batch cannot be "
                                 "split into micro-batches; set it to 1 (and lower the batch size if memory is short).")

    def batch_loss(self, model, batch: Batch) -> BatchLoss:
        tokens = batch["tokens"]
        logits = model.similarity_logits(batch["media"][:, 0], tokens, self.text_positions(tokens))  # [B, B]
        size = logits.shape[0]
        labels = optax.smooth_labels(jax.nn.one_hot(jnp.arange(size), size), self.run.contrastive.label_smoothing)
        loss = 0.5 * (optax.softmax_cross_entropy(logits, labels) + optax.softmax_cross_entropy(logits.T, labels))
        correct = (jnp.argmax(logits, axis=1) == jnp.arange(size)).astype(jnp.float32)
        return BatchLoss(jnp.sum(loss), jnp.asarray(size, jnp.float32), {"image_to_text_accuracy": jnp.sum(correct)})

    def step_flops(self, shapes: Mapping[str, flops.BatchShape],
                   num_microbatches: int = 1) -> flops.ContrastiveStepFlops:
        return flops.contrastive_step_flops(self.run.model, self.run.contrastive.text, shapes)

    def text_positions(self, tokens: Array) -> Array:
        """The caption's own tokens: not padding, BOS/EOS, the image marker or new tokens (<EOC>)."""
        t = self.tokenizer
        special = [] if t is None else [t.pad_id, t.bos_id, t.eos_id, *t.image_marker_ids]
        special = jnp.asarray([i for i in special if i is not None] or [-1], jnp.int32)
        return (tokens < self.run.model.decoder.vocab_size) & ~jnp.isin(tokens, special)

    def weight_metrics(self, params: Any) -> dict[str, Array]:
        return {"inverse_temperature": jnp.exp(params["log_inverse_temperature"])}

    def optimizer(self) -> optax.GradientTransformation:
        """Adam with the paper's split clipping: adaptive gradient clipping (AGC) on the vision
        encoder, a global-norm clip on the text side (text encoder, projections, temperature)."""
        cfg, train = self.run.contrastive, self.run.train
        # A prefix of the DualEncoder's weights (a static tree: optax maps it over abstract states too).
        labels = {"vision_encoder": "vision", "image_projection": "text", "text_encoder": "text",
                  "log_inverse_temperature": "text"}
        clip = optax.multi_transform({"vision": optax.adaptive_grad_clip(cfg.vision_agc),
                                      "text": optax.clip_by_global_norm(cfg.text_clip_norm)}, labels)
        return optax.chain(clip, adamw(train, learning_rate_schedule(train), self.weight_decay_exempt()))

    def export(self, params: Any, frozen: Any) -> dict[str, Any]:
        return {"vision": _cast(params["vision_encoder"], self.run.model.dtypes()[1])}


def _cast(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def make_objective(run: RunConfig, tokenizer: Any = None) -> Objective:
    classes = {cls.name: cls for cls in (FlamingoObjective, LanguageModelObjective, ContrastiveObjective)}
    return classes[run.objective](run, tokenizer)
