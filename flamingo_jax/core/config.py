"""The typed run configuration: every section of a config file, validated at load time.

Config files (`configs/*.py`) are ml_collections ConfigDicts built from
`flamingo_jax.config_defaults.base()`, whose defaults are these dataclasses'.
`RunConfig.from_config(config)` turns one into frozen dataclasses and rejects an
unknown field (with the closest valid name), a value of the wrong type or one
out of range, naming the field and the fix, before anything is built or
compiled. The model section is `models.config.FlamingoConfig`; the data section
is checked by `data.mixture.DatasetSpec`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from flamingo_jax.data.mixture import DatasetSpec
from flamingo_jax.models.config import ConfigError, FlamingoConfig, TextEncoderConfig, build_config

SCHEDULES = ("constant", "cosine", "linear")
OBJECTIVES = ("flamingo", "contrastive", "lm")
ACCUMULATIONS = ("all", "round_robin")
OPTIMIZER_SHARDINGS = ("params", "zero1")
PAPER_WEIGHT_DECAY_EXEMPT = ("resampler",)  # appendix B.1.2: no weight decay on the Perceiver Resampler


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config field `{field}`: {message}")


@dataclasses.dataclass(frozen=True)
class SpikeGuardConfig:
    """Loss-spike rollback (training/spike_guard.py): off by default, on in the paper configs."""

    enabled: bool = False
    factor: float = 2.0  # a step whose loss exceeds factor x the median of the last `window` losses spikes
    window: int = 100
    patience: int = 3  # spiking steps in a row that trigger a rollback
    max_rollbacks: int = 5  # per run; one more stops the run with a message
    lr_scale: float = 1.0  # the learning rate is multiplied by this at each rollback

    def validate(self, path: str = "train.spike_guard") -> "SpikeGuardConfig":
        _require(self.factor > 1, f"{path}.factor", f"{self.factor} must be > 1.")
        _require(self.window >= 2, f"{path}.window", f"{self.window} must be >= 2.")
        _require(self.patience >= 1, f"{path}.patience", f"{self.patience} must be >= 1.")
        _require(self.max_rollbacks >= 0, f"{path}.max_rollbacks", f"{self.max_rollbacks} must be >= 0.")
        _require(0 < self.lr_scale <= 1, f"{path}.lr_scale", f"{self.lr_scale} must be in (0, 1].")
        return self


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe; the defaults are the paper's (appendix B.1.2)."""

    steps: int = 500_000
    learning_rate: float = 1e-4  # peak, after the linear warm-up
    warmup_steps: int = 5_000
    # After warm-up: 'constant' (the paper's Flamingo), 'linear' (to 0 at `steps`: the paper's contrastive
    # pretraining) or 'cosine' (to 0 at `steps`).
    schedule: str = "constant"
    weight_decay: float = 0.1
    # Trainable weights without weight decay (the paper: the Resampler). Each entry is an fnmatch pattern
    # (`*` crosses '/') matched against every trainable leaf's '/'-joined path and each '/'-ending prefix of
    # it: 'resampler' or 'xattn/ffw' name subtrees, '*gate*' and '*norm*' the gates' and norms' leaves
    # (`training.optimizer.exempts`). An entry matching no trainable leaf fails before compiling. The
    # pretraining objectives, which train no Resampler, read the default as exempting nothing.
    weight_decay_exempt: tuple[str, ...] = PAPER_WEIGHT_DECAY_EXEMPT
    grad_clip_norm: float = 1.0  # global norm
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    microbatches: int = 1  # each dataset's batch is split into this many sequential micro-batches
    accumulation: str = "all"  # 'all': every update sums all datasets' gradients; 'round_robin': the ablation
    max_nonfinite_steps: int = 10  # consecutive skipped (non-finite) updates before the run saves and stops
    log_every: int = 10
    tensorboard: bool = True
    spike_guard: SpikeGuardConfig = SpikeGuardConfig()

    def validate(self, path: str = "train") -> "TrainConfig":
        self.spike_guard.validate(f"{path}.spike_guard")
        _require(self.steps >= 1, f"{path}.steps", f"{self.steps} must be >= 1 (the step to train up to).")
        _require(math.isfinite(self.learning_rate) and self.learning_rate > 0, f"{path}.learning_rate",
                 f"{self.learning_rate} must be a finite number > 0 (the paper's is 1e-4).")
        _require(self.warmup_steps >= 0, f"{path}.warmup_steps", f"{self.warmup_steps} must be >= 0.")
        _require(self.schedule in SCHEDULES, f"{path}.schedule", f"{self.schedule!r} is unknown; use one of {SCHEDULES}.")
        _require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"{path}.weight_decay",
                 f"{self.weight_decay} must be >= 0.")
        _require(all(entry.strip("/") for entry in self.weight_decay_exempt), f"{path}.weight_decay_exempt",
                 f"{self.weight_decay_exempt}: every entry must name weights, e.g. 'resampler' or '*gate*'.")
        _require(math.isfinite(self.grad_clip_norm) and self.grad_clip_norm > 0, f"{path}.grad_clip_norm",
                 f"{self.grad_clip_norm} must be > 0 (the paper clips at 1.0).")
        for name in ("adam_b1", "adam_b2"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"{path}.{name}", f"{value} must be in [0, 1).")
        _require(self.adam_eps > 0, f"{path}.adam_eps", f"{self.adam_eps} must be > 0.")
        _require(self.microbatches >= 1, f"{path}.microbatches", f"{self.microbatches} must be >= 1.")
        _require(self.accumulation in ACCUMULATIONS, f"{path}.accumulation",
                 f"{self.accumulation!r} is unknown; use 'all' (gradients of every dataset in each update, the "
                 "paper) or 'round_robin'.")
        _require(self.max_nonfinite_steps >= 1, f"{path}.max_nonfinite_steps",
                 f"{self.max_nonfinite_steps} must be >= 1.")
        _require(self.log_every >= 1, f"{path}.log_every", f"{self.log_every} must be >= 1.")
        return self


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 3  # the newest `keep` checkpoints are kept
    async_save: bool = True

    def validate(self, path: str = "checkpoint") -> "CheckpointConfig":
        _require(self.every_steps >= 1, f"{path}.every_steps", f"{self.every_steps} must be >= 1.")
        _require(self.keep >= 1, f"{path}.keep", f"{self.keep} must be >= 1.")
        return self


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; -1 (at most one axis) takes the rest of the devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self, path: str = "mesh") -> "MeshConfig":
        sizes = dataclasses.asdict(self)
        for name, size in sizes.items():
            _require(size == -1 or size >= 1, f"{path}.{name}", f"{size} must be -1 (the rest) or >= 1.")
        _require(list(sizes.values()).count(-1) <= 1, path, f"{sizes}: at most one axis may be -1.")
        return self


@dataclasses.dataclass(frozen=True)
class BackbonesConfig:
    """Orbax checkpoints of the pretrained frozen weights ('' = random init, tests only)."""

    vision: str = ""
    decoder: str = ""


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """When `out_dir` is set, the project's synthetic corpus is generated there if absent."""

    out_dir: str = ""
    num_examples: int = 2000
    num_eval: int = 200  # per held-out task: half support pool, half queries
    image_size: int = 64
    seed: int = 0

    def validate(self, path: str = "synthetic") -> "SyntheticConfig":
        _require(self.num_examples >= 1, f"{path}.num_examples", f"{self.num_examples} must be >= 1.")
        _require(self.num_eval >= 2, f"{path}.num_eval", f"{self.num_eval} must be >= 2 (one support, one query).")
        _require(self.image_size >= 8, f"{path}.image_size", f"{self.image_size} must be >= 8.")
        return self


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    """The vision encoder's contrastive pretraining (appendix B.1.3); used when objective='contrastive'.
    The vision encoder is `model.vision`'s, so its weights load into a Flamingo with that config."""

    text: TextEncoderConfig = TextEncoderConfig()
    label_smoothing: float = 0.1
    initial_inverse_temperature: float = 10.0  # learnable (its log is a weight)
    vision_agc: float = 0.01  # adaptive gradient clipping (unit-wise, relative to the weights) on the vision encoder
    text_clip_norm: float = 10.0  # global-norm clipping of the text side's gradients

    def validate(self, path: str = "contrastive") -> "ContrastiveConfig":
        self.text.validate(f"{path}.text")
        _require(0 <= self.label_smoothing < 1, f"{path}.label_smoothing", f"{self.label_smoothing} must be in [0, 1).")
        _require(self.initial_inverse_temperature > 0, f"{path}.initial_inverse_temperature", "must be > 0.")
        _require(self.vision_agc > 0, f"{path}.vision_agc", f"{self.vision_agc} must be > 0.")
        _require(self.text_clip_norm > 0, f"{path}.text_clip_norm", f"{self.text_clip_norm} must be > 0.")
        return self


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "flamingo"
    seed: int = 0
    # What the run trains: 'flamingo', or one of its backbones: 'contrastive' (the vision
    # encoder, appendix B.1.3) or 'lm' (the decoder, on text).
    objective: str = "flamingo"
    model: FlamingoConfig = FlamingoConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    # Overrides of the logical-axis rules (models/partitioning.py's DEFAULT_RULES).
    mesh_rules: dict = dataclasses.field(default_factory=dict)
    # Optimizer state: 'params' (laid out as the trainable weights) or 'zero1' (ZeRO stage 1:
    # also split over the 'data' axis, across which the weights are replicated).
    optimizer_sharding: str = "params"
    backbones: BackbonesConfig = BackbonesConfig()
    # Input mixture: tokenizer, image fields and one entry per dataset (data/mixture.py).
    data: dict = dataclasses.field(default_factory=lambda: dict(tokenizer="", image_size=320, datasets=[]))
    synthetic: SyntheticConfig = SyntheticConfig()
    contrastive: ContrastiveConfig = ContrastiveConfig()

    @classmethod
    def from_config(cls, config: Any) -> "RunConfig":
        """Validates a whole config (ConfigDict or dict); the first problem raises `ConfigError`."""
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        run = build_config(cls, values, "")
        _require(run.objective in OBJECTIVES, "objective", f"{run.objective!r} is unknown; use one of {OBJECTIVES}.")
        run.model.validate()
        run.train.validate()
        if run.objective == "contrastive":
            run.contrastive.validate()
        if run.objective != "flamingo" and (run.backbones.vision or run.backbones.decoder):
            raise ConfigError(f"config field `backbones`: objective {run.objective!r} pretrains a backbone from "
                              "scratch and reads none; set backbones.vision and backbones.decoder to ''.")
        run.checkpoint.validate()
        run.mesh.validate()
        run.synthetic.validate()
        _require(run.optimizer_sharding in OPTIMIZER_SHARDINGS, "optimizer_sharding",
                 f"{run.optimizer_sharding!r} is unknown; use one of {OPTIMIZER_SHARDINGS} ('zero1' splits "
                 "optimizer state over the 'data' axis).")
        for rule_name, rule in run.mesh_rules.items():
            axes = rule if isinstance(rule, (list, tuple)) else [rule]
            _require(all(a in (None, "data", "fsdp", "tensor") for a in axes), f"mesh_rules.{rule_name}",
                     f"{rule!r}: a rule names mesh axes ('data', 'fsdp', 'tensor'), a tuple of them, or None.")
        datasets = run.data.get("datasets") or []
        try:
            for position, dataset in enumerate(datasets):
                DatasetSpec.from_dict(dataset, position)
        except ValueError as error:
            raise ConfigError(f"config field `data`: {error}") from None
        return run


def defaults() -> dict[str, Any]:
    """`RunConfig()` as nested dicts: what `config_defaults.base()` starts from."""
    return dataclasses.asdict(RunConfig())


# A resumed run must have been trained as the same model from the same seed; these fields
# may not change on resume (everything else may: steps, mesh, batch sizes, learning rate, ...).
MUST_MATCH_ON_RESUME = ("objective", "seed", "model.", "contrastive.text.")
# Model fields that only change how the same weights are computed.
COMPUTE_ONLY = ("model.remat_policy", "model.attention", "model.dtype")


class ResumeMismatch(ConfigError):
    """A checkpoint whose model or seed differs from the run that would resume it."""


def flat_fields(config: Any, prefix: str = "") -> dict[str, Any]:
    """A config dataclass as {dotted field name: value}."""
    flat: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        name = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            flat.update(flat_fields(value, name + "."))
        else:
            flat[name] = value
    return flat


def resume_changes(saved: Any, run: RunConfig, step: int) -> list[str]:
    """The fields in which `run` differs from the `saved` config of the checkpoint at `step`
    ('field: old -> new'), when resuming may change them; raises `ResumeMismatch` naming the
    fields that may not change, before anything is restored."""
    try:
        before = RunConfig.from_config(saved)
    except ConfigError as error:
        raise ResumeMismatch(f"the checkpoint at step {step} was written with a config this version cannot read "
                             f"({error}); resume it with the version that wrote it, or start a new --workdir.") from None
    old, new = flat_fields(before), flat_fields(run)
    changed = [name for name in new if old.get(name) != new[name]]
    describe = lambda name: f"{name}: {old.get(name)!r} -> {new[name]!r}"
    blocking = [name for name in changed if name.startswith(MUST_MATCH_ON_RESUME) and name not in COMPUTE_ONLY]
    if blocking:
        raise ResumeMismatch(
            f"cannot resume the checkpoint at step {step}: it was trained with a different model or seed "
            f"({'; '.join(describe(n) for n in blocking)}). Resume with the checkpoint's values, or start a new "
            "--workdir; on resume only other fields may change (train.steps, the mesh, batch sizes, the "
            "learning rate, ...).")
    return [describe(name) for name in changed]
