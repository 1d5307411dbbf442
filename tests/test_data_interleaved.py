"""Interleaved documents: round trip through writer and pipeline, `<EOC>` placement,
media_index in both association modes, windows with the first N images, loss mask."""

import numpy as np
import pytest

from flamingo_jax.data import formats, images, interleaved

from test_data_utils import check_contract, collect, make_tokenizer, occupied_slots, red_value, rows, solid_png

IMAGE_CONFIG = images.ImageConfig(size=16)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("plain")), with_image_symbol=False)


# Hand-written expectations. Each entry: (role, payload, image seen in 'previous' mode, in 'next' mode).
# payload: text for 'text', image ordinal for 'marker'.
DOCUMENTS = [
    [("bos", None, -1, 0), ("text", "record zero says hello.", -1, 0), ("eoc", None, -1, 0),
     ("marker", 0, 0, 0), ("text", "a red circle.", 0, 1), ("eoc", None, 0, 1), ("marker", 1, 1, 1),
     ("text", "two blue squares.", 1, -1), ("text", "the end.", 1, -1), ("eoc", None, 1, -1), ("eos", None, 1, -1)],
    # Starts with an image (no <EOC> before it); two images in a row; ends with text.
    [("bos", None, -1, 0), ("marker", 0, 0, 0), ("text", "starts with an image.", 0, 1), ("eoc", None, 0, 1),
     ("marker", 1, 1, 1), ("eoc", None, 1, 2), ("marker", 2, 2, 2), ("text", "end.", 2, -1), ("eoc", None, 2, -1),
     ("eos", None, 2, -1)],
    # Ends with an image: <EOC> before it and after it.
    [("bos", None, -1, 0), ("text", "text before the image", -1, 0), ("eoc", None, -1, 0), ("marker", 0, 0, 0),
     ("eoc", None, 0, -1), ("eos", None, 0, -1)],
]


def image_value(doc: int, ordinal: int) -> int:
    return 40 * doc + 10 * ordinal + 20


def items_of(doc: int, spec) -> list:
    return [t[1] if t[0] == "text" else solid_png(image_value(doc, t[1])) for t in spec if t[0] in ("text", "marker")]


def expand(tok, spec, mode: int):
    """Expected ids and media_index (image ordinals) of a document spec; mode 2 = previous, 3 = next."""
    ids, seen, roles = [], [], []
    for entry in spec:
        role = entry[0]
        new = {"bos": [tok.bos_id], "eos": [tok.eos_id], "eoc": [tok.eoc_id], "marker": list(tok.image_marker_ids),
               "text": tok.encode(entry[1]) if role == "text" else []}[role]
        ids += new
        seen += [entry[mode]] * len(new)
        roles += [role] * len(new)
    return ids, seen, roles


def expected_text(spec) -> str:
    out = ""
    for role, payload, *_ in spec:
        if role == "text":
            out += (" " if out else "") + payload
        elif role == "eoc":
            out += "<EOC>"
        elif role == "marker":
            out += "<image>"
    return out


@pytest.mark.parametrize("p_next", [0.0, 1.0])
def test_round_trip_text_eoc_and_media_index(tmp_path, tok, p_next):
    with formats.InterleavedWriter(str(tmp_path), "docs", 1) as writer:
        for doc, spec in enumerate(DOCUMENTS):
            writer.write(items_of(doc, spec), doc_id=f"doc{doc}")
    config = interleaved.InterleavedConfig(max_len=96, max_images=4, p_next=p_next)
    pipeline = interleaved.InterleavedPipeline(
        str(tmp_path / "docs-*"), 1, tok, config=config, image_config=dataclass_no_aug(), shuffle=False,
        num_epochs=1, process_index=0, process_count=1)  # training (p_next applies), in file order
    examples = rows(collect(pipeline))
    assert len(examples) == len(DOCUMENTS)
    for doc, (spec, example) in enumerate(zip(DOCUMENTS, examples)):
        ids, seen, roles = expand(tok, spec, 3 if p_next else 2)
        n = len(ids)
        np.testing.assert_array_equal(example["tokens"][:n], ids)
        assert (example["tokens"][n:] == tok.pad_id).all()
        assert tok.decode(example["tokens"][:n]) == expected_text(spec)
        np.testing.assert_array_equal(example["media_index"][:n], seen)  # slot = ordinal: all images fit
        assert (example["media_index"][n:] == -1).all()
        num_images = sum(r == "marker" for r in roles)
        np.testing.assert_array_equal(occupied_slots(example["media"]), np.arange(4) < num_images)
        for ordinal in range(num_images):
            assert red_value(example["media"][ordinal], IMAGE_CONFIG) == image_value(doc, ordinal)
        # Loss on text / <EOC> / EOS targets only.
        wanted = [r in ("text", "eoc", "eos") for r in roles[1:]] + [False] * (96 - n + 1)
        np.testing.assert_array_equal(example["loss_mask"], np.asarray(wanted, np.float32))


def test_windows_keep_first_n_images_and_point_only_at_them(tmp_path, tok):
    """Long documents, short windows, 2 slots: every window is a slice of its document, its slots
    hold the first two images whose markers it contains, and nothing points at a dropped image."""
    specs = []
    for doc in range(3):
        spec = [("bos", None)]
        for ordinal in range(7):
            words = ("cat", "dog", "star")[doc]
            spec += [("text", f"{ordinal} {words} {ordinal}")]
            spec += [("eoc", None), ("marker", ordinal)]
        spec += [("text", "the end"), ("eoc", None), ("eos", None)]
        specs.append([s + (None, None) for s in spec])
    with formats.InterleavedWriter(str(tmp_path), "long", 2) as writer:
        for doc, spec in enumerate(specs):
            writer.write(items_of(doc, spec))
    config = interleaved.InterleavedConfig(max_len=20, max_images=2, p_next=0.5)
    pipeline = interleaved.InterleavedPipeline(
        str(tmp_path / "long-*"), 4, tok, config=config, image_config=dataclass_no_aug(), seed=3,
        num_epochs=12, process_index=0, process_count=1)
    full = {}
    for doc, spec in enumerate(specs):
        ids, _, roles = expand(tok, spec, 2)
        ordinals = np.full(len(ids), -1)
        position = 0
        for entry in spec:  # ordinal of each marker token
            length = len(expand(tok, [entry], 2)[0])
            if entry[0] == "marker":
                ordinals[position:position + length] = entry[1]
            position += length
        full[doc] = (np.asarray(ids), ordinals, roles)
    modes = set()
    batches = collect(pipeline)
    assert len(batches) == 9
    for batch in batches:
        check_contract(batch, tok.vocab_size)
    for example in rows(batches):
        tokens = example["tokens"]
        matches = [(doc, s) for doc, (ids, _, _) in full.items() for s in range(len(ids) - 19)
                   if (ids[s:s + 20] == tokens).all()]
        assert len(matches) == 1, "a window must be one contiguous slice of one document"
        doc, start = matches[0]
        ids, ordinals, _ = full[doc]
        window_ordinals = ordinals[start:start + 20]
        in_window = list(dict.fromkeys(o for o in window_ordinals if o >= 0))
        kept = in_window[:2]
        np.testing.assert_array_equal(occupied_slots(example["media"]), [len(kept) > 0, len(kept) > 1])
        for slot, ordinal in enumerate(kept):
            assert red_value(example["media"][slot], IMAGE_CONFIG) == image_value(doc, ordinal)
        # Expected slot per token under each mode, computed on the whole document, then windowed.
        markers = np.where(ordinals >= 0, ordinals, -1)
        previous = np.maximum.accumulate(markers)
        following = np.array([next((o for o in markers[p:] if o >= 0), -1) for p in range(len(ids))])
        expectations = {}
        for mode, seen in (("previous", previous), ("next", following)):
            seen = seen[start:start + 20]
            expectations[mode] = np.array([kept.index(o) if o in kept else -1 for o in seen])
        mode = [m for m, e in expectations.items() if (e == example["media_index"]).all()]
        assert mode, f"media_index {example['media_index']} matches neither association mode"
        modes.update(mode)
        # Markers of dropped images: present as tokens, no loss on them.
        assert not example["loss_mask"][:-1][np.isin(tokens[1:], tok.image_marker_ids)].any()
    assert modes == {"previous", "next"}, "p_next=0.5 should produce both modes over 36 documents"


def dataclass_no_aug():
    return images.ImageConfig(size=16, random_flip=False, color_jitter=False)


@pytest.mark.parametrize("plain", [False, True])
def test_loss_mask_covers_text_and_eoc_never_padding_or_markers(tmp_path, tok, plain_tok, plain):
    tokenizer = plain_tok if plain else tok
    with formats.InterleavedWriter(str(tmp_path), "docs", 1) as writer:
        for doc, spec in enumerate(DOCUMENTS):
            writer.write(items_of(doc, spec))
    config = interleaved.InterleavedConfig(max_len=96, max_images=3, p_next=0.5)
    pipeline = interleaved.InterleavedPipeline(
        str(tmp_path / "docs-*"), 3, tokenizer, config=config, image_config=IMAGE_CONFIG, num_epochs=2,
        process_index=0, process_count=1)
    marker = list(tokenizer.image_marker_ids)
    checked = 0
    for example in rows(collect(pipeline)):
        tokens, targets, mask = example["tokens"], example["targets"], example["loss_mask"]
        n = int(np.sum(tokens != tokenizer.pad_id)) if not plain else None
        marker_target = np.zeros(len(tokens), bool)  # targets[t] is part of an image marker
        for p in range(len(tokens)):
            if tokens[p:p + len(marker)].tolist() == marker:
                marker_target[max(0, p - 1):p + len(marker) - 1] = True
        assert not mask[marker_target].any()
        text_like = np.isin(targets, [tokenizer.eoc_id, tokenizer.eos_id]) | (
            ~np.isin(targets, [tokenizer.pad_id, tokenizer.bos_id]) & ~marker_target)
        if n is not None:
            assert not mask[n - 1:].any(), "no loss on padding (or on the last real token, whose target is padding)"
            text_like[n - 1:] = False
        np.testing.assert_array_equal(mask, text_like.astype(np.float32))
        assert mask[targets == tokenizer.eoc_id].all() and mask.sum() > 0
        checked += 1
    assert checked == 6
