"""Tokenizer: special ids, `<EOC>` rendering, the two kinds of `<image>` marker, the CLI."""

import os

import numpy as np
import pytest

from flamingo_jax.data import sequence, tokenizer

from test_data_utils import WORDS, make_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_cli_writes_model_with_image_symbol_and_eoc(tmp_path, run_cli):
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(1)
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(300)))
    result = run_cli("flamingo_jax.data.tokenizer", "train", f"--input={corpus}", "--vocab_size=300",
                     f"--out={tmp_path / 'm'}", "--num_threads=1", timeout=60)
    assert result.returncode == 0, result.stderr
    tok = tokenizer.Tokenizer(str(tmp_path / "m.model"))
    assert tok.vocab_size == 300 and tok.eoc_id == 300 and tok.total_vocab_size == 301
    assert tok.image_marker_is_symbol and len(tok.image_marker_ids) == 1
    assert tok.sp.id_to_piece(tok.image_marker_ids[0]) == "<image>"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    ids = tok.encode("red circle") + [tok.eoc_id] + list(tok.image_marker_ids) + tok.encode("blue") + [tok.eoc_id]
    assert tok.decode(ids) == "red circle<EOC><image> blue<EOC>"
    # Byte fallback: nothing is unknown.
    assert 0 not in tok.encode("ünïcödé ✓")
    assert tok.decode(tok.encode("ünïcödé ✓")) == "ünïcödé ✓"


def test_literal_image_text_cannot_forge_a_marker_and_eoc_is_never_encoded(tmp_path):
    tok = make_tokenizer(str(tmp_path))
    ids = tok.encode("see <image> and <EOC> here")
    assert tok.image_marker_ids[0] not in ids
    assert tok.eoc_id not in ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.eoc_id + 1])


def test_tokenizing_inside_tf_data(tmp_path):
    from flamingo_jax.data._tf import tf

    tok = make_tokenizer(str(tmp_path))
    texts = ["red cat sits", "a blue dog <image>", ""]
    dataset = tf().data.Dataset.from_tensor_slices(texts).map(tok.tf_encode, num_parallel_calls=2)
    assert [list(ids) for ids in dataset.as_numpy_iterator()] == [tok.encode(t) for t in texts]


def test_model_without_image_symbol_uses_plain_text_marker(tmp_path):
    tok = make_tokenizer(str(tmp_path), with_image_symbol=False)
    assert not tok.image_marker_is_symbol
    marker = list(tok.image_marker_ids)
    assert marker == tok.sp.encode("<image>") and len(marker) > 1
    # A document [text, image, text, image]: every marker token sees its image, none is a loss target.
    document = sequence.tokenize_document(["red cat", None, "blue dog", None], tok)
    example = sequence.window(document, 0, 64, 5, False, tok.pad_id)
    tokens = example.tokens.tolist()
    starts = [p for p in range(len(tokens)) if tokens[p:p + len(marker)] == marker]
    assert len(starts) == 2
    for ordinal, start in enumerate(starts):
        span = range(start, start + len(marker))
        assert all(example.media_index[p] == ordinal for p in span)
        assert tokens[start - 1] == tok.eoc_id  # <EOC> before each marker not at the start
        assert all(example.loss_mask[p - 1] == 0 for p in span)  # predicting a marker token is not trained
    text_targets = [p for p in range(len(tokens) - 1) if example.loss_mask[p] > 0]
    assert text_targets, "text must carry loss"
    # Text before the first marker sees nothing; text after marker i sees image i.
    assert (example.media_index[:starts[0]] == -1).all()
    assert (example.media_index[starts[0]:starts[1]] == 0).all()


def test_training_on_an_empty_or_blank_corpus_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n\t\n")
    for name in ("empty.txt", "blank.txt"):
        with pytest.raises(ValueError, match=f"{name} holds no text"):
            tokenizer.train([str(tmp_path / name)], str(tmp_path / "m"), 300, num_threads=1)
    code = tokenizer._main(["tokenizer", "train", f"--input={tmp_path / 'empty.txt'}", f"--out={tmp_path / 'm'}"])
    assert code == 1 and not (tmp_path / "m.model").exists()
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "empty.txt holds no text" in line
