"""Tests for flamingo_jax.evaluation.metrics.

Expected values are worked out by hand in the comments, or come from the
official scorers (noted where so), or from a deliberately naive CIDEr-D written
here straight from the formula.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

from flamingo_jax.evaluation import metrics as M

L2 = math.log(2.0)  # idf of an n-gram found in 1 of 2 images: log(2) - log(1)


# ---------------------------------------------------------------------------
# VQA normalisation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("a dog", "dog"),  # article removed
        ("The red one", "red 1"),  # article removed, "one" -> "1", lower-cased
        ("yes.", "yes"),  # period not followed by a digit is deleted
        ("3.5", "3.5"),  # period followed by a digit is kept
        ("two", "2"),  # number word -> digit (manualMap)
        ("none", "0"),  # official manualMap maps "none" too
        ("dont", "don't"),  # contraction table
        ("whats", "what's"),
        ("black/white", "black white"),  # punctuation not touching a space -> space
        ("red , blue", "red blue"),  # punctuation touching a space -> deleted
        ("1,000", "1000"),  # digit,digit comma: every punctuation mark deleted
        ("  Yes\tsir\n", "yes sir"),  # tabs/newlines to spaces, stripped
    ],
)
def test_normalize_vqa_answer(raw: str, normalized: str) -> None:
    assert M.normalize_vqa_answer(raw) == normalized


def test_contraction_table_is_the_full_official_one() -> None:
    assert len(M._CONTRACTIONS) == 120
    assert M._CONTRACTIONS["dont"] == "don't"
    assert M._CONTRACTIONS["yall'd've"] == "y'all'd've"
    assert M._CONTRACTIONS["somebody'd"] == "somebodyd"  # official oddity, kept


def test_period_strip_count_quirk() -> None:
    # Official code passes re.UNICODE (= 32) as Pattern.sub's `count`: only
    # the first 32 periods are removed.
    assert M.process_punctuation("." * 40) == "." * 8


# ---------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------

OTHER = ["cat"] * 10  # filler answers that never match


def test_vqa_two_matching_annotators_gives_0_6() -> None:
    # 10 annotators, 2 said "2". Leave each annotator out in turn:
    #  - leaving out one of the 2 matching ones leaves 1 match: min(1, 1/3) = 1/3 (2 times)
    #  - leaving out one of the 8 others leaves 2 matches:     min(1, 2/3) = 2/3 (8 times)
    # mean = (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10 = 0.6
    answers = ["2", "2"] + OTHER[:8]
    assert M.vqa_accuracy("2", answers) == pytest.approx(0.6, abs=1e-12)


def test_vqa_match_counts_official_values() -> None:
    # k matches out of 10: (k * min(1,(k-1)/3) + (10-k) * min(1,k/3)) / 10
    # k=1: (1*0 + 9*1/3)/10 = 0.3;  k=3: (3*2/3 + 7*1)/10 = 0.9;  k=4: (4*1 + 6*1)/10 = 1
    for k, expected in [(0, 0.0), (1, 0.3), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["yes"] * k + ["no"] * (10 - k)
        if k == 10:
            answers = ["yes"] * 10
        assert M.vqa_accuracy("yes", answers) == pytest.approx(expected, abs=1e-12), k


def test_vqa_normalisation_applies_to_prediction_and_answers() -> None:
    # 4 annotators agree after normalisation -> full credit (see k=4 above).
    mixed = ["dog", "a dog", "the dog", "Dog."] + OTHER[:6]
    assert M.vqa_accuracy("a dog", mixed) == 1.0
    assert M.vqa_accuracy("yes.", ["yes"] * 4 + ["no"] * 6) == 1.0
    assert M.vqa_accuracy("two", ["2"] * 4 + ["3"] * 6) == 1.0
    assert M.vqa_accuracy("dont", ["don't"] * 4 + ["no"] * 6) == 1.0
    # Only 2 of these annotators say "dog" -> 0.6 as computed above.
    assert M.vqa_accuracy("The dog", ["dog", "dog"] + OTHER[:8]) == pytest.approx(0.6)


def test_vqa_unanimous_answers_are_not_normalised_officially() -> None:
    # vqaEval.py normalises only when the annotators disagree, so "yes." does
    # not match ten identical "yes" answers; always_normalize changes that.
    assert M.vqa_accuracy("yes.", ["yes"] * 10) == 0.0
    assert M.vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert M.vqa_accuracy("yes.", ["yes"] * 10, always_normalize=True) == 1.0


def test_vqa_corpus_is_percent_over_predicted_questions() -> None:
    gts = {1: ["2", "2"] + OTHER[:8], 2: ["yes"] * 10, 3: ["no"] * 10}
    preds = {1: "two", 2: "yes"}  # question 3 not predicted: not scored
    # (0.6 + 1.0) / 2 = 0.8 -> 80 %
    assert M.vqa_accuracy_corpus(preds, gts) == pytest.approx(80.0)
    with pytest.raises(KeyError, match="no ground-truth"):
        M.vqa_accuracy_corpus({99: "yes"}, gts)


def test_vqa_postprocess_generation() -> None:
    assert M.postprocess_vqa_generation(" Yes<EOC>Question: what") == "yes"
    assert M.postprocess_vqa_generation("Two dogs\nQuestion: x") == "two dogs"
    assert M.postprocess_vqa_generation("red<|endofchunk|>") == "red"
    assert M.postprocess_vqa_generation("blue Question: is it") == "blue"
    assert M.postprocess_vqa_generation("red, blue", first_clause_only=True) == "red"
    assert M.postprocess_caption_generation(' A "big" dog.<EOC>Output: x') == "a big dog."


# ---------------------------------------------------------------------------
# PTB tokenisation (expected strings produced by the Java PTBTokenizer 3.4.1
# as pycocoevalcap runs it)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption, tokenized",
    [
        ("A man riding a horse.", "a man riding a horse"),
        ("Two dogs' bowls (red) on the U.S. flag, don't they?",
         "two dogs bowls -lrb- red -rrb- on the u.s. flag do n't they"),
        ("It's 10:30 and 1,000 people -- cannot stop!!",
         "it 's 10:30 and 1,000 people can not stop !!"),
        ('"Hello" said Mr. Smith... a t-shirt and/or hat.',
         "hello said mr. smith a t-shirt and/or hat"),
        ("The dog\u2019s bed", "the dog 's bed"),
        ("Can't won't shouldn't", "ca n't wo n't should n't"),
        ("A plate of food with a fork & knife.", "a plate of food with a fork & knife"),
        ("A $5 bill; 50% off", "a $ 5 bill 50 % off"),
        ("Rock 'n' roll band", "rock 'n' roll band"),
        ("A man holding a letter a.", "a man holding a letter a"),  # "a." + sentence end: split
        ("10:30 a. & - don't mr.", "10:30 a. & do n't mr."),  # "a." mid-sentence: kept
    ],
)
def test_tokenize_caption_matches_java_ptb_tokenizer(caption: str, tokenized: str) -> None:
    assert M.tokenize_caption(caption) == tokenized


# ---------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------


def naive_cider_d(preds: dict, refs: dict, n: int = 4, sigma: float = 6.0) -> dict:
    """CIDEr-D written from the formula with dense vectors over the vocabulary
    of n-grams, independently of the library's dictionary code."""

    def grams(s: str, k: int) -> Counter:
        w = s.split()
        return Counter(tuple(w[i : i + k]) for i in range(len(w) - k + 1))

    ids = list(preds)
    out = {}
    for i in ids:
        total = 0.0
        for k in range(1, n + 1):
            vocab = sorted({g for j in ids for s in refs[j] + [preds[j]] for g in grams(s, k)})
            df = np.array([sum(any(g in grams(r, k) for r in refs[j]) for j in ids) for g in vocab])
            idf = math.log(len(ids)) - np.log(np.maximum(1.0, df))
            h = np.array([grams(preds[i], k)[g] for g in vocab], dtype=float) * idf
            for r in refs[i]:
                v = np.array([grams(r, k)[g] for g in vocab], dtype=float) * idf
                cos = np.minimum(h, v) @ v
                if np.linalg.norm(h) and np.linalg.norm(v):
                    cos /= np.linalg.norm(h) * np.linalg.norm(v)
                # the official "length" counts bigrams
                delta = sum(grams(preds[i], 2).values()) - sum(grams(r, 2).values())
                total += cos * math.exp(-(delta**2) / (2 * sigma**2)) / len(refs[i])
        out[i] = 100.0 * 10.0 * total / n
    return out


def test_cider_identical_candidates_hand_computed() -> None:
    # Two images. Every n-gram except "a" occurs in one image only, so its
    # idf is log(2) - log(1) = log 2 > 0 ("a" has idf log 2 - log 2 = 0).
    # A candidate equal to its only reference has cosine 1 at every order that
    # has n-grams, and no length penalty:
    #  - 5-word captions have 1..4-grams: mean over n = 1 -> 10 * 1 = 10 -> 1000 %.
    #  - a 2-word caption has no 3- or 4-grams (cosine 0 there):
    #    mean = (1 + 1 + 0 + 0) / 4 = 0.5 -> 5 -> 500 %.
    refs = {"a": ["a cat on a mat"], "b": ["a dog in the park"]}
    corpus, per_id = M.cider_d({"a": "a cat on a mat", "b": "a dog in the park"}, refs)
    assert per_id == pytest.approx({"a": 1000.0, "b": 1000.0})
    assert corpus == pytest.approx(1000.0)
    _, per_id = M.cider_d({"a": "a cat", "b": "a dog"}, {"a": ["a cat"], "b": ["a dog"]})
    assert per_id["a"] == pytest.approx(500.0)


def test_cider_partial_match_hand_computed() -> None:
    # Image A: candidate "a cat", reference "a cat sat"; image B: "a dog ran"
    # for both. idf: "a" -> 0, every other n-gram -> L = log 2.
    # Order 1: hyp {a:0, cat:L}, |hyp| = L; ref {a:0, cat:L, sat:L}, |ref| = L*sqrt2;
    #          clipped dot = min(L, L) * L = L^2 -> cos = 1/sqrt2.
    # Order 2: hyp {"a cat": L}; ref {"a cat": L, "cat sat": L} -> cos = 1/sqrt2.
    # Orders 3, 4: no candidate n-grams -> 0.
    # Length = number of bigrams: 1 vs 2 -> penalty exp(-1 / (2 * 36)).
    # A = 10 * (2 / sqrt2) / 4 * exp(-1/72) = 2.5 * sqrt2 * exp(-1/72) -> x100.
    # B: identical 3-word caption: orders 1..3 give 1, order 4 gives 0 -> 7.5 -> 750.
    preds = {"A": "a cat", "B": "a dog ran"}
    refs = {"A": ["a cat sat"], "B": ["a dog ran"]}
    corpus, per_id = M.cider_d(preds, refs)
    expected_a = 100 * 2.5 * math.sqrt(2) * math.exp(-1 / 72)
    assert per_id["A"] == pytest.approx(expected_a, rel=1e-12)
    assert per_id["B"] == pytest.approx(750.0, rel=1e-12)
    assert corpus == pytest.approx((expected_a + 750.0) / 2, rel=1e-12)


def pycocoevalcap_cider(preds: dict, refs: dict) -> tuple[float, dict]:
    """pycocoevalcap's own CIDEr-D (its Java PTBTokenizer, then Cider), times 100."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs[i]] for i in refs})
    res = tokenizer.tokenize({i: [{"caption": preds[i]}] for i in refs})
    corpus, per_image = Cider().compute_score(gts, res)
    return 100.0 * corpus, {i: 100.0 * float(s) for i, s in zip(gts, per_image)}


def test_cider_matches_official_pycocoevalcap_values() -> None:
    # The reference is computed here by pycocoevalcap itself.
    refs = {
        1: ["A man riding a horse on a beach.", "A person rides a brown horse along the shore.",
            "Man on horseback near the ocean."],
        2: ["Two dogs playing with a red frisbee in the park.", "A couple of dogs chase a frisbee.",
            "Dogs running on grass after a frisbee."],
        3: ["A plate of food with broccoli and rice.",
            "A dinner plate holding rice, broccoli, and chicken.", "Food on a white plate."],
        4: ["A cat sleeping on a laptop keyboard.", "The cat is lying on top of a laptop.",
            "A kitten naps on a computer."],
    }
    preds = {1: "a man riding a horse on the beach", 2: "two dogs playing frisbee in a park",
             3: "a plate of rice and broccoli", 4: "a dog sitting on a couch"}
    corpus, per_id = M.cider_d(preds, refs)
    official_corpus, official = pycocoevalcap_cider(preds, refs)
    assert corpus == pytest.approx(official_corpus, rel=1e-12)
    assert per_id == pytest.approx(official, rel=1e-12)


def test_cider_matches_naive_reimplementation_on_random_corpora() -> None:
    rng = random.Random(0)
    vocab = "a man dog cat on the red two with of".split()
    for _ in range(20):
        ids = range(rng.randint(2, 6))
        preds = {i: " ".join(rng.choices(vocab, k=rng.randint(0, 9))) for i in ids}
        refs = {i: [" ".join(rng.choices(vocab, k=rng.randint(1, 9)))
                    for _ in range(rng.randint(1, 4))] for i in ids}
        _, per_id = M.cider_d(preds, refs, tokenize=False)
        assert per_id == pytest.approx(naive_cider_d(preds, refs), rel=1e-9, abs=1e-9)


def test_cider_no_overlap_scores_zero() -> None:
    _, per_id = M.cider_d({"A": "zebra grazing", "B": "a dog ran"},
                          {"A": ["a cat sat"], "B": ["a dog ran"]})
    assert per_id["A"] == 0.0


def test_cider_length_penalty() -> None:
    refs = {"A": ["a cat sat on the mat"], "B": ["a dog ran in the park"]}
    exact = "a cat sat on the mat"
    long = exact + " with many other words added at the very end of it"
    s_exact = M.cider_d({"A": exact, "B": "a dog"}, refs)[1]["A"]
    s_long = M.cider_d({"A": long, "B": "a dog"}, refs)[1]["A"]
    assert s_long < s_exact
    # With sigma -> infinity the penalty vanishes; the ratio is exactly the
    # Gaussian penalty for the bigram-length difference (16 - 5 = 11).
    s_long_no_penalty = M.cider_d({"A": long, "B": "a dog"}, refs, sigma=1e12)[1]["A"]
    assert s_long / s_long_no_penalty == pytest.approx(math.exp(-(11**2) / 72), rel=1e-12)


def test_cider_clipping_of_repeated_words() -> None:
    # Image A reference "cat", B "dog"; idf(cat) = L.
    # Candidate "cat": cos = 1 at order 1, nothing at 2..4 -> 10 * 1/4 = 2.5 -> 250.
    # Candidate "cat cat cat": hyp weight 3L but the dot product is clipped to
    # min(3L, L) * L = L^2, while |hyp| = 3L -> cos = 1/3 (unclipped it would
    # stay 1). Its 2 bigrams ("cat cat" x2) find nothing in the reference, and
    # the length is 2 bigrams vs 0 -> penalty exp(-4/72).
    # Score = 10 * (1/3) / 4 * exp(-4/72) -> x100.
    refs = {"A": ["cat"], "B": ["dog"]}
    single = M.cider_d({"A": "cat", "B": "dog"}, refs)[1]["A"]
    repeated = M.cider_d({"A": "cat cat cat", "B": "dog"}, refs)[1]["A"]
    assert single == pytest.approx(250.0)
    assert repeated == pytest.approx(100 * 10 * (1 / 3) / 4 * math.exp(-4 / 72), rel=1e-12)
    assert repeated < single


def test_cider_tokenizes_like_cocoevalcap() -> None:
    refs = {"A": ["A cat sat."], "B": ["A dog ran!"]}
    assert M.cider_d({"A": "A CAT, sat", "B": "a dog ran"}, refs) == M.cider_d(
        {"A": "a cat sat", "B": "a dog ran"}, refs
    )


def test_cider_rejects_mismatched_ids() -> None:
    with pytest.raises(ValueError, match="same ids"):
        M.cider_d({"A": "a cat"}, {"B": ["a cat"]})
    with pytest.raises(ValueError, match="no reference"):
        M.cider_d({"A": "a cat"}, {"A": []})


# ---------------------------------------------------------------------------
# ROC-AUC and top-1
# ---------------------------------------------------------------------------


def test_roc_auc_hand_cases() -> None:
    # Positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won (0.35>0.1),
    # lost (0.35<0.4), won, won -> 3/4 = 75 %.
    assert M.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(75.0)
    assert M.roc_auc([0.1, 0.2, 0.3], [0, 1, 1]) == pytest.approx(100.0)
    assert M.roc_auc([0.9, 0.2, 0.3], [0, 1, 1]) == pytest.approx(0.0)


def test_roc_auc_ties_count_half() -> None:
    # Positives 0.5, 0.9 vs negatives 0.2, 0.5: win, tie (1/2), win, win
    # -> 3.5 / 4 = 87.5 %. Average ranks: 0.2->1, 0.5,0.5->2.5, 0.9->4;
    # U = (2.5 + 4) - 2*3/2 = 3.5.
    assert M.roc_auc([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(87.5)
    assert M.roc_auc([0.5, 0.5, 0.5], [1, 0, 1]) == pytest.approx(50.0)
    assert M._average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_roc_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="positive and one negative"):
        M.roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0/1"):
        M.roc_auc([0.1, 0.2], [0, 2])


def test_top1_accuracy() -> None:
    assert M.top1_accuracy([1, 2, 3, 4], [1, 2, 0, 0]) == pytest.approx(50.0)
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert M.top1_accuracy(scores, [1, 0, 0]) == pytest.approx(200.0 / 3)
    assert M.top1_accuracy(["man", "dog"], ["man", "cat"]) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="2 predictions but 3 targets"):
        M.top1_accuracy([1, 2], [1, 2, 3])
