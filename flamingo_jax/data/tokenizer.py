"""SentencePiece tokenizer with Flamingo's two extra notions: `<image>` and `<EOC>`.

Vocabulary layout (the model relies on it):
  ids [0, vocab_size)   the frozen LM's SentencePiece vocabulary (`vocab_size` =
                        the model's piece count; the LM's embeddings stay frozen);
  id  vocab_size        `<EOC>` ("end of chunk"), the one NEW token, with a
                        trainable embedding row. It is not in the SentencePiece
                        model: it is only ever inserted as an id, never parsed
                        from text, so no user text can produce it.

`<image>` (the marker where an image appears in the text):
  * Models trained here (`train` below / the CLI) declare `<image>` as a
    user-defined symbol, so the marker is ONE id inside the frozen vocabulary.
  * A user's Chinchilla/LLaMA-family `.model` that lacks the symbol gets
    `<image>` "as plain text" (paper, appendix B.1.2): the marker is the id
    sequence that the text "<image>" encodes to, e.g. 4-5 pieces. The first
    marker token is where the image starts; every marker token cross-attends to
    its image (`media_index`), and no marker token is ever a loss target: the
    model is not asked to predict where images go.
  The pipelines insert marker ids at known positions and keep the bookkeeping
  positional, so they never search token streams for markers. To keep user
  text from forging a marker, a literal "<image>" inside text is encoded as
  "< image>" (see `encode`).

Special ids: BOS starts every sequence if the model has one; EOS follows the
final `<EOC>` if the model has one; `pad_id` is the model's pad piece if it has
one, else 0 (padding is always masked out, so its id only has to be valid).

Hugging Face tokenizers (`tokenizer.json`, the `tokenizers` package): `HFTokenizer`
has the same interface, with the layout OpenFlamingo gives LLaMA / MPT tokenizers:
  ids [0, vocab_size)   the tokenizer's own tokens, added ones included (`len(tokenizer)`);
  id  vocab_size        `<EOC>` (OpenFlamingo's `<|endofchunk|>`), and
  id  vocab_size + 1    `<image>`, both NEW special tokens with trainable rows:
                        `num_new_tokens` = 2 (config.model.num_new_tokens must cover it).
`load_tokenizer(path)` picks the class by the file (`.json`: Hugging Face).

Command line (trains a model with byte fallback and `<image>` as a symbol):
  python -m flamingo_jax.data.tokenizer train --input=corpus.txt \
      --vocab_size=512 --out=/path/model_prefix     # writes model_prefix.model
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

from flamingo_jax import cli
from flamingo_jax.data.errors import DataError, DataFileMissing

IMAGE_TEXT = "<image>"
EOC_TEXT = "<EOC>"
# How a literal "<image>" in document text is written before encoding (see module docstring).
_ESCAPED_IMAGE_TEXT = "< image>"
_ESCAPED_EOC_TEXT = "< EOC>"


def _read_bytes(path: str) -> bytes:
    if "://" in path:  # gs://, s3://...: through TensorFlow's file system layer
        from flamingo_jax.data._tf import tf

        with tf().io.gfile.GFile(path, "rb") as f:
            return f.read()
    if not os.path.exists(path):
        raise DataFileMissing(
            f"SentencePiece model {path!r} does not exist; pass the path of a `.model` file "
            "(train one with `python -m flamingo_jax.data.tokenizer train --input=... --vocab_size=... --out=...`)."
        )
    with open(path, "rb") as f:
        return f.read()


class Tokenizer:
    """A frozen SentencePiece vocabulary plus `<EOC>` and the `<image>` marker.

    Thread-safe for encoding and decoding (the SentencePiece processor is
    read-only after loading), so tf.data may call it from several threads.
    """

    num_new_tokens = 1  # <EOC>; the marker lives in the frozen vocabulary (a symbol or plain text)

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._model_proto = _read_bytes(model_path)
        self.digest = hashlib.sha256(self._model_proto).hexdigest()  # what a program holding its ids depends on
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self._model_proto)
        except (RuntimeError, OSError) as error:
            raise DataError(f"{model_path!r} is not a SentencePiece model ({error}).") from error
        self.vocab_size: int = self.sp.get_piece_size()
        self.eoc_id: int = self.vocab_size
        self.bos_id: int | None = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id: int | None = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        symbol_id = self.sp.piece_to_id(IMAGE_TEXT)
        self.image_marker_is_symbol: bool = not self.sp.is_unknown(symbol_id) and not self.sp.is_control(symbol_id)
        if self.image_marker_is_symbol:
            self.image_marker_ids: tuple[int, ...] = (symbol_id,)
        else:
            self.image_marker_ids = tuple(self.sp.encode(IMAGE_TEXT))
            if not self.image_marker_ids:
                raise DataError(f"SentencePiece model {model_path!r} encodes {IMAGE_TEXT!r} to no ids at all.")

    @property
    def total_vocab_size(self) -> int:
        """Frozen vocabulary plus `<EOC>`: the model's output size."""
        return self.vocab_size + 1

    def special_ids(self) -> tuple[int, ...]:
        """Ids of the frozen vocabulary that are not text: control pieces, unknown, the image marker."""
        control = [i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)]
        return tuple(sorted(set(control) | set(self.image_marker_ids)))

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids (no BOS/EOS, never `<EOC>` or a forged single-id marker)."""
        return self.sp.encode(text.replace(IMAGE_TEXT, _ESCAPED_IMAGE_TEXT))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like `encode` for many texts. One call per text: SentencePiece's list API spends
        ~150 us per call on its thread pool, 20x the cost of encoding a caption."""
        return [self.encode(t) for t in texts]

    def tf_encode(self, text):
        """Inside a tf.data map: string scalar tensor -> int32 [n] ids (`encode` via
        `tf.numpy_function`), for pipelines built outside this package."""
        from flamingo_jax.data._tf import tf

        ids = tf().numpy_function(
            lambda t: np.asarray(self.encode(t.decode("utf-8", "replace")), np.int32), [text], tf().int32,
            stateful=False)
        return tf().ensure_shape(ids, [None])

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids -> text; `<EOC>` is rendered as "<EOC>", a symbol marker as "<image>".

        BOS/EOS/pad pieces decode to nothing (SentencePiece control symbols);
        strip padding with the batch's masks before decoding if the model's pad
        id is an ordinary piece.
        """
        pieces: list[str] = []
        run: list[int] = []
        for token in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if token == self.eoc_id:
                pieces.append(self.sp.decode(run))
                pieces.append(EOC_TEXT)
                run = []
            elif 0 <= token < self.vocab_size:
                run.append(token)
            else:
                raise DataError(
                    f"token id {token} is outside the vocabulary [0, {self.vocab_size}] "
                    f"({self.vocab_size} frozen ids + <EOC>={self.eoc_id}); was it produced with another tokenizer?"
                )
        pieces.append(self.sp.decode(run))
        return "".join(pieces)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size}, eoc_id={self.eoc_id}, "
                f"image_marker_ids={self.image_marker_ids}, bos_id={self.bos_id}, eos_id={self.eos_id})")


def _special_token(config: dict, name: str) -> str | None:
    """A tokenizer_config.json special token: a string, or an AddedToken dict's content."""
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` plus `<EOC>` and `<image>` as two new special tokens.

    The ids of both are right after the tokenizer's vocabulary, in OpenFlamingo's
    order (`add_special_tokens({"additional_special_tokens": ["<|endofchunk|>",
    "<image>"]})`), so `<EOC>` is `vocab_size` as the model expects. BOS/EOS/pad
    come from a `tokenizer_config.json` beside the file, if any. Thread-safe: the
    `tokenizers` Tokenizer is immutable once loaded.
    """

    num_new_tokens = 2  # <EOC>, <image>

    def __init__(self, path: str):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as RustTokenizer

        self.model_path = path
        if "://" not in path and not os.path.exists(path):
            raise DataFileMissing(f"tokenizer {path!r} does not exist; pass a Hugging Face tokenizer.json or a "
                                  "SentencePiece .model.")
        try:
            serialized = _read_bytes(path)
            self.hf = RustTokenizer.from_str(serialized.decode("utf-8"))
        except Exception as error:  # tokenizers raises its own Exception subclass
            raise DataError(f"{path!r} is not a Hugging Face tokenizer.json ({error}).") from error
        self.digest = hashlib.sha256(serialized).hexdigest()
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        for text in (EOC_TEXT, IMAGE_TEXT):
            if self.hf.token_to_id(text) is not None:
                raise DataError(f"tokenizer {path!r} already has {text!r} (id {self.hf.token_to_id(text)}); pass "
                                "the checkpoint's original tokenizer.json: Flamingo adds it after the vocabulary.")
        self.hf.add_special_tokens([AddedToken(EOC_TEXT, special=True), AddedToken(IMAGE_TEXT, special=True)])
        self.eoc_id = self.vocab_size
        self.image_id = self.vocab_size + 1
        if (self.hf.token_to_id(EOC_TEXT), self.hf.token_to_id(IMAGE_TEXT)) != (self.eoc_id, self.image_id):
            raise DataError(f"tokenizer {path!r}: its vocabulary has gaps, so the new tokens did not get ids "
                            f"{self.eoc_id} and {self.image_id}.")
        self.image_marker_is_symbol = True
        self.image_marker_ids = (self.image_id,)
        config = {}
        config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
        if os.path.isfile(config_path):
            import json

            with open(config_path) as f:
                config = json.load(f)
        ids = {name: self.hf.token_to_id(token) if (token := _special_token(config, name)) else None
               for name in ("bos_token", "eos_token", "pad_token")}
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
        self.pad_id = ids["pad_token"] if ids["pad_token"] is not None else 0

    @property
    def total_vocab_size(self) -> int:
        return self.vocab_size + self.num_new_tokens

    def special_ids(self) -> tuple[int, ...]:
        named = (self.bos_id, self.eos_id, self.pad_id, *self.image_marker_ids)
        return tuple(sorted({i for i in named if i is not None and i < self.vocab_size}))

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids (no BOS/EOS); a literal "<image>" / "<EOC>" in the text stays text."""
        text = text.replace(IMAGE_TEXT, _ESCAPED_IMAGE_TEXT).replace(EOC_TEXT, _ESCAPED_EOC_TEXT)
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_with_markers(self, text: str) -> list[int]:
        """Text whose "<image>" and "<EOC>" are the new tokens -> ids, as the reference tokenizer
        with them added encodes it (prompts written by hand; pipelines insert the ids instead)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids -> text; `<EOC>` and `<image>` rendered as their text."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
        for token in ids:
            if not 0 <= token < self.total_vocab_size:
                raise DataError(f"token id {token} is outside the vocabulary [0, {self.total_vocab_size}) "
                                f"({self.vocab_size} ids + <EOC>, <image>); was it produced with another tokenizer?")
        return self.hf.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return (f"HFTokenizer({self.model_path!r}, vocab_size={self.vocab_size}, eoc_id={self.eoc_id}, "
                f"image_id={self.image_id}, bos_id={self.bos_id}, eos_id={self.eos_id})")


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer at `path`: a Hugging Face `tokenizer.json` (`.json`), else a SentencePiece `.model`."""
    return HFTokenizer(path) if path.endswith(".json") else Tokenizer(path)


def train(
    input_files: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    *,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    num_threads: int | None = None,
) -> str:
    """Trains a SentencePiece model for Flamingo; returns the `.model` path.

    Byte fallback is on (no text is ever unknown), `<image>` is a user-defined
    symbol (one id), ids 0-3 are unk/bos/eos/pad. Whitespace is kept as written
    (`remove_extra_whitespaces=False`, as LLaMA's tokenizer does) so that the
    paper's "prepend a single space with probability 0.5" augmentation of
    paired captions changes the tokens instead of being normalised away.
    `num_threads=1` makes training deterministic.
    """
    if not input_files:
        raise DataError("tokenizer training needs at least one --input text file.")
    for path in input_files:
        if "://" not in path and not os.path.exists(path):
            raise DataFileMissing(f"tokenizer training input {path!r} does not exist.")
    if not any(_holds_text(path) for path in input_files):
        raise DataError(f"tokenizer training input {', '.join(input_files)} holds no text: give UTF-8 text files "
                         "with one sentence or paragraph per line.")
    if vocab_size < 262:
        raise DataError(
            f"vocab_size={vocab_size} is too small: byte fallback alone needs 256 byte pieces plus "
            "unk/bos/eos/pad and <image>; use at least 262 (e.g. 512)."
        )
    out_dir = os.path.dirname(model_prefix)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(input_files),
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=True,
            user_defined_symbols=[IMAGE_TEXT],
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            remove_extra_whitespaces=False,
            split_digits=True,
            input_sentence_size=0,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as error:
        message = " ".join(str(error).split())
        most = re.search(r"value <= (\d+)", message)
        if "Vocabulary size" in message:
            raise DataError(
                f"vocab_size={vocab_size} is more pieces than the training text supports"
                f"{f' (at most {most[1]})' if most else ''}; lower --vocab_size or train on more text."
            ) from error
        raise DataError(f"SentencePiece could not train on {', '.join(input_files)}: {message}") from error
    return model_prefix + ".model"


def _holds_text(path: str) -> bool:
    """Whether the file has a non-whitespace character (read in blocks: corpora can be large)."""
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            if block.strip():
                return True
    return False


def _main(argv: list[str]) -> int:
    from absl import flags

    flag_values = flags.FlagValues()
    flags.DEFINE_list("input", None, "Text file(s), one sentence or paragraph per line.", flag_values=flag_values)
    flags.DEFINE_integer("vocab_size", 32000, "Pieces in the model (frozen vocabulary size).", flag_values=flag_values)
    flags.DEFINE_string("out", None, "Model prefix; writes <out>.model and <out>.vocab.", flag_values=flag_values)
    flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "SentencePiece algorithm.", flag_values=flag_values)
    flags.DEFINE_float("character_coverage", 1.0, "Share of characters covered.", flag_values=flag_values)
    flags.DEFINE_integer("num_threads", 0, "Training threads; 0 = all cores, 1 = deterministic.",
                         flag_values=flag_values)
    rest = cli.parse(flag_values, argv, __doc__)
    if len(rest) != 2 or rest[1] != "train":
        print("usage: python -m flamingo_jax.data.tokenizer train --input=corpus.txt --vocab_size=N --out=prefix",
              file=sys.stderr)
        return 2
    if not flag_values.input or not flag_values.out:
        print("--input and --out are required.", file=sys.stderr)
        return 2
    try:
        path = train(flag_values.input, flag_values.out, flag_values.vocab_size, model_type=flag_values.model_type,
                     character_coverage=flag_values.character_coverage, num_threads=flag_values.num_threads or None)
    except (ValueError, OSError) as error:
        print(f"tokenizer train: {error}", file=sys.stderr)
        return 1
    tokenizer = Tokenizer(path)
    print(f"wrote {path}: {tokenizer}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.guard(lambda: _main(sys.argv)))
