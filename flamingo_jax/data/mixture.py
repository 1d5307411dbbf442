"""The training data mixture: one pipeline per dataset, all stepped together.

The paper accumulates gradients over ALL datasets for every update (appendix
B.1.2: better than round-robin), each with its own batch size and loss weight
(M3W 1.0, ALIGN 0.2, LTIP 0.2, VTP 0.03). So a step's input is a dict
`{dataset name: batch}`, and `Mixture.weights` gives the λ per name.

Config (an ml_collections ConfigDict or a plain dict), e.g. `config.data`:
  tokenizer     path of the SentencePiece .model
  image_size    S, pixels of the square model input (e.g. 320)
  image_mean, image_std   optional per-channel constants (default: CLIP's)
  random_flip, color_jitter   optional bools (training augmentation; default True)
  image_max_pixels   optional: larger images are skipped as `image_too_large` (default images.MAX_PIXELS)
  datasets      list of dataset specs, each a dict with the fields of `DatasetSpec`:
      dict(name="m3w", kind="interleaved", pattern="/data/m3w/m3w-*.tfrecord",
           batch_size=256, weight=1.0, max_len=256, max_images=5, p_next=0.5)
      dict(name="ltip", kind="image_text", pattern=..., batch_size=512, weight=0.2, max_len=32)
      dict(name="vtp", kind="video_text", pattern=..., batch_size=64, weight=0.03, num_frames=8, fps=1.0)
      dict(name="coco", kind="tfds", tfds_builder="coco_captions", tfds_split="train[:90%]",
           tfds_data_dir="gs://bucket/tfds", tfds_fields=dict(image="image", text="captions/text"),
           batch_size=512, weight=0.2)   # a prepared TFDS builder instead of shards (data/tfds_source.py)
      dict(name="copying", kind="repeats", batch_size=8, max_len=128, min_repeat_len=10,
           max_repeat_len=40)   # random-token runs said twice, no files: LM pretraining (data/repeats.py)
      dict(name="recall", kind="repeats", drill="recall", batch_size=8, min_repeat_len=1,
           max_repeat_len=3, max_keys=6, max_frame_len=4)   # keys bound to runs, looked up later
  `from_step` (any kind) holds a dataset out of the steps before it: a curriculum, e.g. the
  copying drills alone first, the corpus joining at step 1,500 (configs/tiny.py's LM stage).
  A dataset whose skipped records (bad records and damaged file stretches) pass
  `max_skip_fraction` of those read (default 0.1, checked after
  `skip_check_min_records`, default 1000) stops the run with an error naming it.

Usage in a train loop:
  mixture = Mixture.from_config(config.data, seed=config.seed)   # this host's share
  mixture.set_state(saved)                                       # when resuming
  for step, batches in zip(range(start, steps), mixture):        # {name: batch}
      ...  loss = sum(mixture.weights[n] * loss_n)
      if checkpoint_now: save(..., data_state=mixture.get_state())   # JSON-serialisable
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from flamingo_jax.data import formats, images, repeats
from flamingo_jax.data.errors import DataError
from flamingo_jax.data.interleaved import InterleavedConfig, InterleavedPipeline
from flamingo_jax.data.pairs import ImageTextPipeline, PairConfig, VideoTextPipeline
from flamingo_jax.data.pipeline import RecordPipeline, resolve_process
from flamingo_jax.data.tfds_source import TfdsFields, TfdsSource
from flamingo_jax.data.tokenizer import Tokenizer, load_tokenizer

TFDS = "tfds"  # a mixture entry read from a prepared TFDS builder (data/tfds_source.py)
KINDS = (*formats.KINDS, TFDS, repeats.KIND)
_DEFAULT_MAX_LEN = {formats.INTERLEAVED: 256, formats.IMAGE_TEXT: 32, formats.VIDEO_TEXT: 32, repeats.KIND: 128}
# Records of interleaved documents and videos hold many images: a smaller buffer bounds host memory.
_DEFAULT_SHUFFLE_BUFFER = {formats.INTERLEAVED: 256, formats.IMAGE_TEXT: 2048, formats.VIDEO_TEXT: 256}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the mixture. Fields that do not apply to `kind` are ignored."""

    name: str
    kind: str  # 'interleaved' | 'image_text' | 'video_text' | 'tfds' | 'repeats'
    batch_size: int  # per host
    pattern: str = ""  # glob of the TFRecord shards (comma-separated globs allowed); not for 'tfds', 'repeats'
    weight: float = 1.0  # λ: this dataset's loss weight
    from_step: int = 0  # the first step with this dataset's batches (a curriculum; 0: every step)
    max_len: int = 0  # L; 0 = kind default (256 interleaved, 32 pairs, 128 repeats)
    max_images: int = 5  # interleaved: N media slots
    p_next: float = 0.5  # interleaved
    max_images_per_doc: int = 32  # interleaved: larger documents are skipped
    p_leading_space: float = 0.5  # pairs
    num_frames: int = 8  # video: T
    fps: float = 1.0  # video: sampled frames per second
    shuffle_buffer: int = 0  # 0 = kind default
    image_size: int = 0  # 0 = the data config's image_size
    random_flip: bool | None = None  # None = the data config's
    color_jitter: bool | None = None  # None = the data config's
    max_skip_fraction: float = 0.1  # more skipped records than this share stops the run (1.0: never)
    skip_check_min_records: int = 1000  # ... once this many records were read
    tfds_builder: str = ""  # kind 'tfds': the builder name (optionally 'name/config:version')
    tfds_split: str = "train"  # ... the split, with TFDS slicing ('train[:90%]')
    tfds_data_dir: str = ""  # ... where it was prepared ('' = TFDS's default, ~/tensorflow_datasets)
    tfds_fields: dict = dataclasses.field(default_factory=dict)  # ... image or frames (+ frame_rate), text
    drill: str = "copy"  # kind 'repeats': 'copy' (runs said twice) or 'recall' (keys bound to runs)
    min_repeat_len: int = 10  # ... the shortest run of random tokens
    max_repeat_len: int = 40  # ... the longest
    first_copy_loss: bool = False  # ... copy: also score a run's first saying (unpredictable)
    max_keys: int = 6  # ... recall: each row binds 2..max_keys keys
    max_frame_len: int = 0  # ... recall: a frame of 0..max_frame_len pieces between each key and value

    @property
    def record_kind(self) -> str:
        """The batches' kind: `kind`, or for a TFDS entry the kind its field map makes."""
        if self.kind == TFDS:
            return TfdsFields.from_dict(self.tfds_fields, f"dataset {self.name!r}").kind
        return self.kind

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | Any, position: int = 0) -> DatasetSpec:
        values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
        fields = {f.name for f in dataclasses.fields(cls)}
        where = f"data.datasets[{position}] ({values.get('name', '?')!r})"
        unknown = sorted(set(values) - fields)
        if unknown:
            raise DataError(f"{where}: unknown field {unknown[0]!r}; valid fields are {sorted(fields)}.")
        sources = {TFDS: ("tfds_builder",), repeats.KIND: ()}
        required = ("name", "kind", "batch_size") + sources.get(values.get("kind"), ("pattern",))
        missing = [f for f in required if f not in values]
        if missing:
            raise DataError(f"{where}: missing required field {missing[0]!r}.")
        spec = cls(**values)
        if spec.kind not in KINDS:
            raise DataError(f"{where}: kind={spec.kind!r} is unknown; use one of {KINDS}.")
        if spec.kind == repeats.KIND and spec.pattern:
            raise DataError(f"{where}: kind='repeats' generates its rows and reads no files; drop "
                            f"pattern={spec.pattern!r}.")
        if spec.kind == TFDS:
            if spec.pattern:
                raise DataError(f"{where}: kind='tfds' reads tfds_builder/tfds_split, not pattern={spec.pattern!r}; "
                                "drop `pattern`.")
            if not spec.tfds_split:
                raise DataError(f"{where}: missing required field 'tfds_split' (e.g. 'train' or 'train[:90%]').")
            TfdsFields.from_dict(spec.tfds_fields, where)
        if spec.batch_size < 1:
            raise DataError(f"{where}: batch_size={spec.batch_size} must be >= 1.")
        if spec.from_step < 0:
            raise DataError(f"{where}: from_step={spec.from_step} must be >= 0 (0: the dataset is in every step).")
        if not np.isfinite(spec.weight) or spec.weight < 0:
            raise DataError(f"{where}: weight={spec.weight} must be a finite number >= 0.")
        if not 0.0 <= spec.max_skip_fraction <= 1.0:
            raise DataError(f"{where}: max_skip_fraction={spec.max_skip_fraction} must be in [0, 1] (1: no limit).")
        return spec


def build_pipeline(spec: DatasetSpec, tokenizer: Tokenizer, image_config: images.ImageConfig,
                   **kwargs: Any) -> RecordPipeline:
    """The pipeline for one dataset spec. kwargs go to `RecordPipeline` (seed, training, ...)."""
    overrides = {k: getattr(spec, k) for k in ("random_flip", "color_jitter") if getattr(spec, k) is not None}
    if spec.image_size:
        overrides["size"] = spec.image_size
    image_config = dataclasses.replace(image_config, **overrides)
    kind = spec.record_kind
    max_len = spec.max_len or _DEFAULT_MAX_LEN[kind]
    if kind == repeats.KIND:
        process_index, process_count = resolve_process(kwargs.get("process_index"), kwargs.get("process_count"))
        return repeats.RepeatsPipeline(
            spec.name, spec.batch_size, repeats.ordinary_ids(tokenizer.vocab_size, tokenizer.special_ids()),
            max_len=max_len, min_run=spec.min_repeat_len, max_run=spec.max_repeat_len, bos_id=tokenizer.bos_id,
            first_copy_loss=spec.first_copy_loss, drill=spec.drill, max_keys=spec.max_keys,
            max_frame_len=spec.max_frame_len,
            seed=kwargs.get("seed", 0), process_index=process_index,
            process_count=process_count)
    kwargs.setdefault("shuffle_buffer", spec.shuffle_buffer or _DEFAULT_SHUFFLE_BUFFER[kind])
    kwargs.setdefault("max_skip_fraction", spec.max_skip_fraction)
    kwargs.setdefault("skip_check_min_records", spec.skip_check_min_records)
    common = dict(name=spec.name, image_config=image_config, **kwargs)
    source: Any = spec.pattern
    if spec.kind == TFDS:
        where = f"dataset {spec.name!r}"
        source = TfdsSource(spec.tfds_builder, spec.tfds_split, spec.tfds_data_dir,
                            TfdsFields.from_dict(spec.tfds_fields, where), where=where)
    if kind == formats.INTERLEAVED:
        config = InterleavedConfig(max_len=max_len, max_images=spec.max_images, p_next=spec.p_next,
                                   max_images_per_doc=spec.max_images_per_doc)
        return InterleavedPipeline(source, spec.batch_size, tokenizer, config=config, **common)
    pair_config = PairConfig(max_len=max_len, p_leading_space=spec.p_leading_space, num_frames=spec.num_frames,
                             fps=spec.fps)
    cls = ImageTextPipeline if kind == formats.IMAGE_TEXT else VideoTextPipeline
    return cls(source, spec.batch_size, tokenizer, config=pair_config, **common)


def image_config_from(data_config: Mapping[str, Any]) -> images.ImageConfig:
    """`images.ImageConfig` from the data config's image fields."""
    values: dict[str, Any] = {}
    if "image_size" in data_config:
        values["size"] = int(data_config["image_size"])
    for source, target in (("image_mean", "mean"), ("image_std", "std")):
        if data_config.get(source) is not None:
            values[target] = tuple(float(v) for v in data_config[source])
    for key in ("random_flip", "color_jitter"):
        if data_config.get(key) is not None:
            values[key] = bool(data_config[key])
    if data_config.get("image_max_pixels") is not None:
        values["max_pixels"] = int(data_config["image_max_pixels"])
    return images.ImageConfig(**values)


class Mixture:
    """Steps every dataset's pipeline once per step: yields `{name: batch}`."""

    def __init__(self, pipelines: Mapping[str, RecordPipeline], weights: Mapping[str, float], *,
                 tokenizer: Tokenizer | None = None, specs: Mapping[str, DatasetSpec] | None = None):
        if not pipelines:
            raise DataError("a data mixture needs at least one dataset (data.datasets is empty).")
        if set(pipelines) != set(weights):
            raise DataError(f"pipelines {sorted(pipelines)} and weights {sorted(weights)} name different datasets.")
        self.pipelines = dict(pipelines)
        self.weights = {name: float(w) for name, w in weights.items()}
        self.tokenizer = tokenizer
        self.specs = dict(specs or {})

    @classmethod
    def from_config(cls, data_config: Mapping[str, Any] | Any, *, seed: int = 0, training: bool = True,
                    process_index: int | None = None, process_count: int | None = None,
                    num_epochs: int | None = None, tokenizer: Tokenizer | None = None) -> Mixture:
        """Builds this host's pipelines from `config.data` (see the module docstring)."""
        data_config = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
        allowed = {"tokenizer", "image_size", "image_mean", "image_std", "random_flip", "color_jitter",
                   "image_max_pixels", "datasets"}
        unknown = sorted(set(data_config) - allowed)
        if unknown:
            raise DataError(f"data config: unknown field {unknown[0]!r}; valid fields are {sorted(allowed)}.")
        if tokenizer is None:
            if not data_config.get("tokenizer"):
                raise DataError("data config: set `tokenizer` to the SentencePiece .model or tokenizer.json path.")
            tokenizer = load_tokenizer(data_config["tokenizer"])
        specs = [DatasetSpec.from_dict(d, i) for i, d in enumerate(data_config.get("datasets") or [])]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise DataError(f"data.datasets: dataset names {names} repeat; give every dataset its own name.")
        image_config = image_config_from(data_config)
        pipelines = {
            spec.name: build_pipeline(spec, tokenizer, image_config, seed=seed, training=training,
                                      process_index=process_index, process_count=process_count,
                                      num_epochs=num_epochs)
            for spec in specs
        }
        return cls(pipelines, {spec.name: spec.weight for spec in specs}, tokenizer=tokenizer,
                   specs={spec.name: spec for spec in specs})

    def __iter__(self) -> Iterator[dict[str, dict[str, np.ndarray]]]:
        return self

    def __next__(self) -> dict[str, dict[str, np.ndarray]]:
        return {name: next(pipeline) for name, pipeline in self.pipelines.items()}

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state of this host's pipelines."""
        return {"version": 1, "datasets": {name: p.get_state() for name, p in self.pipelines.items()}}

    def set_state(self, state: Mapping[str, Any] | str) -> None:
        """Resume from `get_state()` output (or its JSON string)."""
        if isinstance(state, str):
            state = json.loads(state)
        saved = dict(state.get("datasets", {}))
        if set(saved) != set(self.pipelines):
            raise DataError(
                f"saved data state has datasets {sorted(saved)} but this mixture has {sorted(self.pipelines)}; "
                "restore with the same data.datasets names (or start the data stream afresh)."
            )
        for name, pipeline in self.pipelines.items():
            pipeline.set_state(saved[name])

    def close(self) -> None:
        """Stops every pipeline's background work (also done automatically at exit)."""
        for pipeline in self.pipelines.values():
            pipeline.close()

    def skip_counts(self) -> dict[str, dict[str, int]]:
        """Per dataset: records skipped so far, by reason."""
        return {name: p.skip_counts() for name, p in self.pipelines.items()}
