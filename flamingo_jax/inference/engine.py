"""The Python inference API: interleaved prompts in, text or log-likelihoods out.

    engine = Engine.from_workdir("workdirs/tiny")
    engine.generate([[Media(path="cat.jpg"), "Output:"]])          # -> ["a cat ..."]
    engine.score([[Media(path="cat.jpg"), "Is it a cat? Answer:"]], [["yes", "no"]])

Three compiled programs per shape bucket (prefill, decode, score), with the
weights passed as arguments, so new prompts of a seen bucket never recompile.
They run the model over per-layer weights and caches (`models/unrolled.py`): the
stacked layers are split once here, which makes each decoding step read every
weight and cache slot where it lies.

Each media item is encoded (read, vision encoder, Perceiver Resampler) once, up
to `MEDIA_BATCH` items per call, and its visual tokens are kept (`VisualTokenCache`):
a few-shot evaluation shows every support image in many prompts, and the paper's
prompt ensembling shows each prompt's images six times.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flamingo_jax.data.images import ImageConfig
from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.errors import UserError
from flamingo_jax.inference import decoding, prompting
from flamingo_jax.inference.items import Media
from flamingo_jax.inference.prompting import PromptError
from flamingo_jax.models import unrolled
from flamingo_jax.models.flamingo import Flamingo

MEDIA_BATCH = 8
"""Media items per call of the encoding program at most (fewer: padded to a power of two)."""


class VisualTokenCache:
    """Visual tokens by (loader, media content), least recently used dropped past `max_bytes`.

    Content, not object identity: prompt builders make a new `Media` for the same file each
    time. A file is known by its path, size and modification time (so an edited file is read
    again), an array by its bytes' digest; the loader is part of the key because `with_video`
    and `blind` show the same item as other pixels."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._bytes = 0

    @staticmethod
    def content_key(media: Media) -> tuple:
        def file(path):
            try:
                stat = os.stat(path)
            except OSError:  # unreadable: never cached, the loader names the problem
                return (str(path), None, None)
            return (str(path), stat.st_size, stat.st_mtime_ns)

        if media.array is not None:
            return ("array", media.array.shape, hashlib.sha1(np.ascontiguousarray(media.array)).hexdigest())
        if media.frames is not None:
            return ("frames", tuple(file(p) for p in media.frames), media.fps)
        return ("path", file(media.path))

    def get(self, key: tuple) -> np.ndarray | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: tuple, value: np.ndarray) -> None:
        if key in self._entries:
            return
        self._entries[key] = value
        self._bytes += value.nbytes
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.nbytes

    def __len__(self) -> int:
        return len(self._entries)


class DecodeOptionsError(UserError, ValueError):
    """Decoding settings that cannot work."""


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How to pick new tokens. method: 'beam' (the paper's, beam 3), 'greedy' or 'sample'."""

    method: str = "beam"
    max_new_tokens: int = 20
    num_beams: int = 3
    length_penalty: float = 0.0  # GNMT alpha; 0 ranks beams by log-probability
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("beam", "greedy", "sample"):
            raise DecodeOptionsError(f"decoding method {self.method!r} is unknown; use 'beam', 'greedy' or 'sample'.")
        if self.max_new_tokens < 1:
            raise DecodeOptionsError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens}).")
        if self.method == "beam" and self.num_beams < 1:
            raise DecodeOptionsError(f"num_beams must be >= 1 (got {self.num_beams}).")
        if self.method == "sample" and self.temperature <= 0:
            raise DecodeOptionsError(f"temperature must be > 0 (got {self.temperature}); use --method=greedy for "
                                     "temperature 0.")
        if self.method == "sample" and not 0 < self.top_p <= 1:
            raise DecodeOptionsError(f"top_p must be in (0, 1] (got {self.top_p}).")
        if self.top_k < 0:
            raise DecodeOptionsError(f"top_k must be >= 0 (got {self.top_k}; 0 samples from every token).")


class Engine:
    """A Flamingo with weights, its tokenizer and image preparation, and compiled programs."""

    def __init__(self, model: Flamingo, tokenizer: Tokenizer, image_config: ImageConfig, *,
                 min_length: int = 32, video_frames: int | None = None, video_fps: float | None = None,
                 consume_model: bool = False):
        """`video_frames` (default: the model's `vision.num_frames`) frames are fed per video,
        sampled at `video_fps` when the video's stored rate is known (`prompting.MediaLoader`).
        `consume_model`: free the model's stacked layers as they are split (it is unusable after),
        so the weights are never held twice."""
        cfg = model.cfg
        if tokenizer.vocab_size != cfg.decoder.vocab_size:
            raise PromptError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model's frozen vocabulary "
                             f"has {cfg.decoder.vocab_size}; load the tokenizer the model was trained with.")
        if image_config.size != cfg.vision.image_size:
            raise PromptError(f"images are prepared at {image_config.size} px but the model takes "
                             f"{cfg.vision.image_size} px; use the training run's data config.")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.load_media = prompting.MediaLoader(
            image_config, cfg.vision.num_frames if video_frames is None else video_frames, video_fps)
        self.min_length = min_length
        # The model's state without its stacked layers, and those as per-layer arrays.
        self.graphdef, self.state, self.layer_states = unrolled.split_for_decoding(model, consume=consume_model)
        self.stop_ids = (tokenizer.eoc_id,) + ((tokenizer.eos_id,) if tokenizer.eos_id is not None else ())
        jit = functools.partial(jax.jit, compiler_options=unrolled.COMPILER_OPTIONS)
        self._prefill = jit(self._prefill_fn, static_argnames=("num_slots",))
        self._encode = jax.jit(self._encode_fn)
        self.visual_cache = VisualTokenCache()
        self._decode = jit(self._decode_fn, static_argnames=("options",))
        self._score = jit(self._score_fn)
        self.step: int | None = None  # set when loaded from a training run
        self.run_config = None

    @classmethod
    def from_workdir(cls, workdir: str, *, step: int | None = None, tokenizer_path: str | None = None,
                     **kwargs) -> Engine:
        """The model a training run saved in `workdir` (latest step unless `step`)."""
        from flamingo_jax.inference.loading import load_trained

        trained = load_trained(workdir, step=step, tokenizer_path=tokenizer_path)
        engine = cls(trained.model, trained.tokenizer, trained.image_config, consume_model=True, **kwargs)
        engine.step, engine.run_config = trained.step, trained.config
        return engine

    def with_video(self, num_frames: int, fps: float | None) -> Engine:
        """This engine (same weights, same compiled programs) feeding `num_frames` frames per
        video, sampled at `fps` (None: evenly over the clip); e.g. the paper's evaluation, 30
        frames at 3 FPS, on a model trained with 8."""
        engine = copy.copy(self)
        engine.load_media = prompting.MediaLoader(self.load_media.config, num_frames, fps)
        return engine

    # ------------------------------------------------------------------ programs
    @property
    def model(self) -> Flamingo:
        """The whole model, layers re-stacked (a copy of their weights): for forward passes."""
        return unrolled.merge_stacked(self.graphdef, self.state, self.layer_states)

    def _model(self, state, layer_states) -> unrolled.UnrolledFlamingo:
        return unrolled.UnrolledFlamingo.merge(self.graphdef, state, layer_states)

    def _prefill_fn(self, state, layer_states, tokens, visual, media_index, positions, valid, *, num_slots):
        return decoding.prefill_visual(self._model(state, layer_states), tokens, visual, media_index, positions,
                                       valid, num_slots)

    def _encode_fn(self, state, pixels):  # [N, T, S, S, 3] -> visual tokens [N, R, D]
        return nnx.merge(self.graphdef, state).encode_media(pixels[:, None])[:, 0]

    def _decode_fn(self, state, layer_states, context, key, *, options: DecodeOptions):
        model = self._model(state, layer_states)
        common = {"max_new_tokens": options.max_new_tokens, "stop_ids": self.stop_ids, "pad_id": self.tokenizer.pad_id}
        if options.method == "beam":
            return decoding.beam_search(model, context, num_beams=options.num_beams, alpha=options.length_penalty,
                                        **common)
        choose = (decoding.greedy_chooser() if options.method == "greedy" else
                  decoding.sampling_chooser(options.temperature, options.top_k, options.top_p))
        return decoding.decode(model, context, key, choose=choose, **common)

    def _score_fn(self, state, layer_states, context, tokens, valid):
        return decoding.score_continuations(self._model(state, layer_states), context, tokens, valid)

    # ------------------------------------------------------------------ prompts
    def _encode_prompts(self, prompts: Sequence[Sequence[object]]) -> list[prompting.EncodedPrompt]:
        return [prompting.encode_prompt(items, self.tokenizer, media_association=self.cfg.xattn.media_association)
                for items in prompts]

    def batch(self, prompts: Sequence[Sequence[object]], *, batch_size: int | None = None,
              reserve: int = 0) -> prompting.PromptBatch:
        """Encodes and pads prompts, media as pixels (what the model's forward pass takes);
        `reserve` tokens of the context stay free for what follows."""
        return prompting.make_batch(self._encode_prompts(prompts), self.load_media, pad_id=self.tokenizer.pad_id,
                                    min_length=self.min_length, max_length=self.cfg.decoder.max_len - reserve,
                                    batch_size=batch_size)

    def visual_batch(self, prompts: Sequence[Sequence[object]], *, batch_size: int | None = None,
                     reserve: int = 0) -> prompting.PromptBatch:
        """`batch` with each media item's visual tokens [R, D] in place of its pixels (what
        `prefill` takes); media seen before are not read or encoded again."""
        rows = prompting.batch_rows(self._encode_prompts(prompts), batch_size)
        visual = self.visual_tokens([m for row in rows for m in row.media])
        per_row, start = [], 0
        for row in rows:
            per_row.append(visual[start:start + len(row.media)])
            start += len(row.media)
        item = self._visual_item
        return prompting.assemble_batch(rows, per_row, item.shape, item.dtype, pad_id=self.tokenizer.pad_id,
                                        min_length=self.min_length, max_length=self.cfg.decoder.max_len - reserve)

    def visual_tokens(self, media: Sequence[Media]) -> list[np.ndarray]:
        """The visual tokens [R, D] of each media item as the current loader shows it (the
        Perceiver Resampler's output), encoding only the items not in `visual_cache`."""
        keys = [(self.load_media, self.visual_cache.content_key(m)) for m in media]
        found = {key: self.visual_cache.get(key) for key in keys}
        by_frames: dict[int, list[tuple[tuple, np.ndarray]]] = {}
        for key, item in dict(zip(keys, media)).items():
            if found[key] is None:
                pixels = self.load_media(item)
                by_frames.setdefault(pixels.shape[0], []).append((key, pixels))
        for group in by_frames.values():
            for start in range(0, len(group), MEDIA_BATCH):
                chunk = group[start:start + MEDIA_BATCH]
                pixels = [p for _, p in chunk]
                pixels += [pixels[-1]] * (min(MEDIA_BATCH, prompting.next_power_of_two(len(pixels))) - len(pixels))
                tokens = np.asarray(self._encode(self.state, np.stack(pixels)))
                for (key, _), item_tokens in zip(chunk, tokens):
                    found[key] = item_tokens
                    self.visual_cache.put(key, item_tokens)
        return [found[key] for key in keys]

    @functools.cached_property
    def _visual_item(self) -> jax.ShapeDtypeStruct:
        """Shape [R, D] and dtype of one item's visual tokens."""
        size = self.cfg.vision.image_size
        pixels = jax.ShapeDtypeStruct((1, 1, size, size, 3), jnp.float32)
        tokens = jax.eval_shape(self._encode_fn, self.state, pixels)
        return jax.ShapeDtypeStruct(tokens.shape[1:], tokens.dtype)

    def prefill(self, batch: prompting.PromptBatch, num_new: int) -> decoding.Context:
        """The prompts of a `visual_batch`, with `num_new` cache slots free after them."""
        return self._prefill(self.state, self.layer_states, *batch.arrays(), num_slots=batch.tokens.shape[1] + num_new)

    @contextlib.contextmanager
    def blind(self, media: Sequence[Media]) -> Iterator[np.ndarray]:
        """Within the block, every Media of every prompt (and of `media_features`) is seen as
        one image: the pixel-wise mean of `media` as prepared for the model (resized,
        normalised; video frames count as images). Yields that image [S, S, 3]."""
        image = prompting.mean_image(self.load_media, media)
        seeing, self.load_media = self.load_media, prompting.BlindLoader(self.load_media, image)
        try:
            yield image
        finally:
            self.load_media = seeing

    # ------------------------------------------------------------------ API
    def generate_ids(self, prompts: Sequence[Sequence[object]], options: DecodeOptions = DecodeOptions(), *,
                     batch_size: int | None = None) -> decoding.Decoded:
        """New token ids [B, N] (stop token included), their lengths and scores."""
        batch = self.visual_batch(prompts, batch_size=batch_size, reserve=options.max_new_tokens)
        context = self.prefill(batch, options.max_new_tokens)
        key = jax.random.key(options.seed)
        decoded = self._decode(self.state, self.layer_states, context, key,
                               options=dataclasses.replace(options, seed=0))  # seed: not static
        return jax.tree.map(lambda x: np.asarray(x)[:len(prompts)], decoded)

    def generate(self, prompts: Sequence[Sequence[object]], options: DecodeOptions = DecodeOptions(), *,
                 batch_size: int | None = None) -> list[str]:
        """Generated text per prompt, up to (not including) the first `<EOC>`."""
        decoded = self.generate_ids(prompts, options, batch_size=batch_size)
        return [self.text(ids[:length]) for ids, length in zip(decoded.tokens, decoded.lengths)]

    def text(self, ids: np.ndarray) -> str:
        ids = [int(i) for i in ids]
        while ids and ids[-1] in self.stop_ids:
            ids.pop()
        return self.tokenizer.decode([i for i in ids if i < self.tokenizer.vocab_size]).strip()

    def score(self, prompts: Sequence[Sequence[object]], candidates: Sequence[Sequence[str]], *,
              end_with_eoc: bool = True, batch_size: int | None = None) -> list[np.ndarray]:
        """Log-likelihood of each prompt's candidate continuations (with a closing `<EOC>`
        unless `end_with_eoc=False`, so that 'yes' is not rewarded for being the start of
        'yes, but'), tokenized as the rest of the prompt's last text (`prompting.continuation_ids`).
        Prompts in one call must have the same number of candidates."""
        counts = {len(c) for c in candidates}
        if len(candidates) != len(prompts) or len(counts) != 1:
            raise PromptError("score() needs one list of candidates per prompt, all of the same length.")
        encoded = [[prompting.continuation_ids(items, text, self.tokenizer)
                    + ([self.tokenizer.eoc_id] if end_with_eoc else []) for text in row]
                   for items, row in zip(prompts, candidates)]
        longest = max(len(ids) for row in encoded for ids in row)
        if longest == 0:
            raise PromptError("every candidate is empty; give non-empty answers (or keep end_with_eoc).")
        length = prompting.round_up(longest, 8)
        batch = self.visual_batch(prompts, batch_size=batch_size, reserve=length)
        rows = batch.tokens.shape[0]
        encoded += [encoded[-1]] * (rows - len(encoded))
        tokens = np.full((rows, counts.pop(), length), self.tokenizer.pad_id, np.int32)
        valid = np.zeros(tokens.shape, bool)
        for b, row in enumerate(encoded):
            for c, ids in enumerate(row):
                tokens[b, c, :len(ids)] = ids
                valid[b, c, :len(ids)] = True
        context = self.prefill(batch, length)
        scores = np.asarray(self._score(self.state, self.layer_states, context, tokens, valid))
        return list(scores[:len(prompts)])

    def media_features(self, media: Sequence[object], *, batch_size: int = 16) -> np.ndarray:
        """Mean-pooled vision-encoder features [N, Dv] of media items (for RICES)."""
        pooled = []
        for start in range(0, len(media), batch_size):
            chunk = list(media[start:start + batch_size])
            pixels = [self.load_media(m) for m in chunk]
            pixels += [pixels[-1]] * (batch_size - len(pixels))
            pooled.append(np.asarray(self._features(self.state, np.stack(pixels)))[:len(chunk)])
        return np.concatenate(pooled)

    @functools.cached_property
    def _features(self):
        def features(state, pixels):  # [N, T, S, S, 3] -> [N, Dv]
            n, t = pixels.shape[:2]
            out = nnx.merge(self.graphdef, state).vision_encoder(pixels.reshape(n * t, *pixels.shape[2:]))
            return jnp.mean(out.reshape(n, -1, out.shape[-1]), axis=1)

        return jax.jit(features)
