"""Evaluation metrics for the Flamingo benchmarks, re-implemented in pure Python.

Flamingo's Table 1 numbers come from the benchmarks' official scorers, so these
functions copy those scorers' behaviour, quirks included, rather than a cleaned
up reading of the metric:

* VQA accuracy (VQAv2, OK-VQA, VizWiz, TextVQA): the VQA API's ``vqaEval.py``
  (GT-Vision-Lab/VQA, master): its answer normalisation and its
  leave-one-annotator-out ``min(1, matches / 3)`` average.
* CIDEr (COCO, Flickr30K, VATEX, YouCook2): the COCO caption toolkit's
  ``pycocoevalcap/cider/cider_scorer.py``, which is CIDEr-D, preceded by an
  approximation in Python of its Stanford PTBTokenizer step (no Java needed).
* ROC-AUC (HatefulMemes) and top-1 accuracy (MSVD-QA, MSRVTT-QA, ImageNet...).

Scale convention: every corpus-level score is returned in percent, the scale of
the paper's tables (VQA accuracy 57.8, CIDEr 113.8, ROC-AUC 70.0). CIDEr "in
percent" means pycocoevalcap's score (which is about 1.1 for a good COCO
model) times 100. Only the per-question `vqa_accuracy` is a fraction in
[0, 1], the quantity the VQA formula defines for one question.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Hashable, Mapping, Sequence

import numpy as np

# ---------------------------------------------------------------------------
# VQA accuracy (vqaEval.py)
# ---------------------------------------------------------------------------

# The official contraction table, verbatim (120 entries). Some keys can never
# match because answers are lower-cased before the lookup ("Im", "Ive", "Id've"),
# and "somebody'd" maps to "somebodyd"; both kept as in the official code.
_CONTRACTIONS: dict[str, str] = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've",
    'couldnt': "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    'didnt': "didn't", 'doesnt': "doesn't", 'dont': "don't", 'hadnt': "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
    'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    'hes': "he's", 'howd': "how'd", 'howll': "how'll", 'hows': "how's",
    "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm", 'Ive': "I've", 'isnt': "isn't",
    'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll",
    "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", 'mightve': "might've",
    'mustnt': "mustn't", 'mustve': "must've", 'neednt': "needn't", 'notve': "not've",
    'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", 'shant': "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    'shouldve': "should've", 'shouldnt': "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd',
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    'somebodyll': "somebody'll", 'somebodys': "somebody's", 'someoned': "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    'somethingll': "something'll", 'thats': "that's", 'thered': "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", 'therere': "there're",
    'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're",
    'theyve': "they've", 'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", 'weve': "we've", 'werent': "weren't", 'whatll': "what'll",
    'whatre': "what're", 'whats': "what's", 'whatve': "what've", 'whens': "when's",
    'whered': "where'd", 'wheres': "where's", 'whereve': "where've", 'whod': "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", 'wholl': "who'll", 'whos': "who's",
    'whove': "who've", 'whyll': "why'll", 'whyre': "why're", 'whys': "why's",
    'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", 'yall': "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're",
    'youve': "you've",
}

# Number words the official code maps to digits. "none" -> "0" is official too.
_MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# Official regexes, verbatim. "(?!<=\d)" is a (buggy) negative *lookahead* for
# the text "<=digit", which can never follow a period, so in effect a period is
# deleted unless a digit follows it ("3.5" keeps its period, "yes." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official code passes re.UNICODE as the third positional argument of
# Pattern.sub, which is `count`: at most 32 periods are removed. Kept.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
_PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)
# The 3 in the official min(1, matches / 3): with one of the 10 annotators left
# out, 3 of the remaining 9 agreeing with the prediction is full credit.
_VQA_FULL_CREDIT_MATCHES = 3


def _clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip: the first step for every answer."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`.

    A punctuation mark touching a space (or any text with a digit,digit comma)
    is deleted; otherwise it is replaced by a space ("black/white" becomes
    "black white"). Note the test looks at the *input* text, not the text as
    rewritten so far, exactly as the official loop does. Finally periods not
    followed by a digit are deleted.
    """
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words to digits,
    drop articles, then expand contractions written without an apostrophe."""
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """Full official normalisation of one answer: whitespace, punctuation, then
    digits/articles/contractions ("Two dogs." -> "2 dogs", "dont" -> "don't")."""
    return process_digit_article(process_punctuation(_clean_whitespace(answer)))


def vqa_accuracy(
    prediction: str, gt_answers: Sequence[str], *, always_normalize: bool = False
) -> float:
    """VQA accuracy of one prediction, as a fraction in [0, 1].

    The official score averages, over the 10 ways of leaving one annotator
    out, ``min(1, (#remaining annotators who gave the prediction) / 3)``, so it
    is 1.0 once 4 annotators agree with the prediction, 0.9 with 3, 0.6 with 2
    and 0.3 with 1.

    Quirk kept from the official code: the answers are only normalised when the
    annotators disagree (more than one distinct answer after whitespace
    cleaning). When all annotators gave the same string, the prediction must
    equal it exactly ("yes." scores 0 against ten "yes"). Pass
    ``always_normalize=True`` to normalise in every case instead (not official).
    """
    if len(gt_answers) == 0:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer.")
    prediction = _clean_whitespace(prediction)
    answers = [_clean_whitespace(a) for a in gt_answers]
    if always_normalize or len(set(answers)) > 1:
        answers = [process_digit_article(process_punctuation(a)) for a in answers]
        prediction = process_digit_article(process_punctuation(prediction))
    total_matches = sum(a == prediction for a in answers)
    per_left_out = [
        min(1.0, (total_matches - (a == prediction)) / _VQA_FULL_CREDIT_MATCHES)
        for a in answers
    ]
    return sum(per_left_out) / len(per_left_out)


def vqa_accuracy_corpus(
    predictions: Mapping[Hashable, str],
    gt_answers: Mapping[Hashable, Sequence[str]],
    *,
    always_normalize: bool = False,
) -> float:
    """Mean VQA accuracy over the questions in `predictions`, in percent.

    Every predicted question id must have ground truth; ground truth for
    questions not predicted is ignored, so a query subset of a split can be
    scored against the whole split's annotations. The official script also
    rounds to 2 decimals for display; this returns the unrounded value.
    """
    if not predictions:
        raise ValueError("vqa_accuracy_corpus got no predictions.")
    missing = [qid for qid in predictions if qid not in gt_answers]
    if missing:
        raise KeyError(
            f"{len(missing)} predicted question ids have no ground-truth answers, "
            f"e.g. {missing[:5]}"
        )
    scores = [
        vqa_accuracy(pred, gt_answers[qid], always_normalize=always_normalize)
        for qid, pred in predictions.items()
    ]
    return 100.0 * sum(scores) / len(scores)  # summed in order, as the official code


# ---------------------------------------------------------------------------
# Post-processing of generated text
# ---------------------------------------------------------------------------

# Flamingo ends every example with <EOC>; OpenFlamingo's tokenizer calls it
# <|endofchunk|>. A newline also ends a short answer.
GENERATION_STOP_STRINGS: tuple[str, ...] = ("<EOC>", "<|endofchunk|>", "\n")
# When a model fails to stop, it starts the next few-shot example; OpenFlamingo
# cuts the answer at these prompt words (case-sensitive, before lower-casing).
_VQA_PROMPT_MARKERS = re.compile("Question|Answer|Short")
_CAPTION_PROMPT_MARKER = "Output"


def _truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Cut `text` at the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stop_strings:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


def postprocess_vqa_generation(
    generated: str,
    *,
    stop_strings: Sequence[str] = GENERATION_STOP_STRINGS,
    first_clause_only: bool = False,
) -> str:
    """Turn a generated continuation of ``Question: ... Answer:`` into an answer.

    Cuts at the first stop string (<EOC>, <|endofchunk|>, newline) and at any
    "Question"/"Answer"/"Short" the model went on to write (OpenFlamingo's
    `postprocess_vqa_generation`), then strips and lower-cases.
    ``first_clause_only`` also keeps only the text before the first ", ", which
    OpenFlamingo does too; it is off by default because Flamingo's paper does
    not say it did this. The result is then scored by `vqa_accuracy`, which
    applies the official normalisation itself.
    """
    answer = _truncate_at_stop(generated, stop_strings)
    answer = _VQA_PROMPT_MARKERS.split(answer, maxsplit=1)[0]
    if first_clause_only:
        answer = answer.split(", ", 1)[0]
    return answer.strip().lower()


def postprocess_caption_generation(
    generated: str, *, stop_strings: Sequence[str] = GENERATION_STOP_STRINGS
) -> str:
    """Turn a generated continuation of ``Output:`` into a caption.

    Cuts at the first stop string and at any further "Output" (the start of a
    hallucinated next example, as OpenFlamingo does), removes double quotes
    (OpenFlamingo), strips and lower-cases. CIDEr's tokenizer lower-cases and
    drops punctuation itself, so nothing else is needed.
    """
    caption = _truncate_at_stop(generated, stop_strings)
    caption = caption.split(_CAPTION_PROMPT_MARKER, 1)[0]
    return caption.replace('"', "").strip().lower()


# ---------------------------------------------------------------------------
# PTB tokenisation (pycocoevalcap/tokenizer/ptbtokenizer.py)
# ---------------------------------------------------------------------------

# Tokens pycocoevalcap deletes after tokenising, verbatim. Its Java tokenizer
# runs with -lowerCase, which lower-cases "-LRB-" to "-lrb-" *before* this
# filter, so the bracket entries never match and brackets survive as "-lrb-",
# "-rrb-", "-lsb-", "-rsb-", "-lcb-", "-rcb-" tokens. Kept.
PTB_PUNCTUATIONS: frozenset[str] = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-",
             "{": "-lcb-", "}": "-rcb-"}
_QUOTE_MAP = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201b": "'", "\u00b4": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
})
# Abbreviations PTBLexer keeps with their period (its ABBREV1/ABBREV2 lists:
# titles, months, days, company and street words...).
_ABBREVIATIONS = (
    "mr|mrs|ms|mx|drs?|profs?|sens?|reps?|govs?|attys?|st|ste|mt|ft|jr|sr|vs|v|"
    "etc|al|seq|inc|cos?|corp|ltd|plc|bros|esq|ave|blvd|rd|dept|natl|gen|col|lt|"
    "sgt|capt|rev|hon|adm|maj|cpl|pvt|messrs|cf|jan|feb|mar|apr|jun|jul|aug|"
    "sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri"
)
# Abbreviations kept only before a number ("no. 5", "fig. 2"): ABBREV3.
_NUMBER_ABBREVIATIONS = "ca|figs?|prop|nos?|sects?|secs?|arts?|paras?|pp|op|approx"
_ALNUM = r"[^\W_]"
_NUM = r"\d+(?:[.,:]\d+)+"  # 1,000  3.5  10:30
_UNIT = rf"(?:{_NUM}|{_ALNUM}+)"
# Alternatives are tried in order (Python regexes take the first that matches,
# the Java lexer the longest), so the lookaheads stop a short match from
# winning where PTBLexer would take a longer token.
_PTB_TOKEN = re.compile(
    rf"""
      (?P<space>\s+)
    | (?P<ellipsis>\.\.\.+|\u2026)
    | (?P<acronym>[a-z](?:\.[a-z])*\.)(?!{_ALNUM})      # a.  u.s.  e.g.
    | (?P<abbrev>(?:{_ABBREVIATIONS})\.)(?!{_ALNUM})
    | (?P<numabbrev>(?:{_NUMBER_ABBREVIATIONS})\.)(?=\s?\d)
    | (?P<social>\#[^\W\d_]\w*|@[a-z_]\w*)             # #hashtag @name
    | (?P<clitic>'(?:s|m|d|re|ve|ll|n'?)(?!{_ALNUM})|'t(?!\S))  # 's 're 'n' ('t of 'tis)
    | (?P<word>[+-]\d+(?:[.,:]\d+)*(?:-{_UNIT})*       # -5  -2.5-inch
        | {_UNIT}(?:[-/'.]{_UNIT})*)                     # t-shirt and/or o'clock 3.5
    | (?P<dashes>--+|[\u2013\u2014\u2015])
    | (?P<bang>[?!]+)
    | (?P<dquote>")
    | (?P<squote>''|``|['`])
    | (?P<other>.)
    """,
    re.VERBOSE | re.IGNORECASE,
)
# PTB splits "don't" -> "do n't", "dog's" -> "dog 's", "cannot" -> "can not".
_NT = re.compile(rf"(?<={_ALNUM})n't(?!{_ALNUM})", re.IGNORECASE)
_CLITIC = re.compile(rf"(?<={_ALNUM})'(?:s|m|d|re|ve|ll)(?!{_ALNUM})", re.IGNORECASE)
_ASSIMILATION = re.compile(
    r"(?<![\w#@])(?:(can)(not)|(gon|wan)(na)|(got)(ta)|(lem|gim)(me)|('t)(is|was))"
    r"(?!\w|'\w)",  # "cannot's" stays whole, as the Java lexer leaves it
    re.IGNORECASE,
)
_OPENING_CONTEXT = frozenset("([{<`\"'")


def _split_assimilation(match: re.Match[str]) -> str:
    """'cannot' -> 'can not' etc., as PTBLexer's ASSIMILATIONS rules do."""
    return " ".join(g for g in match.groups() if g is not None)


def _at_sentence_end(text: str, pos: int) -> bool:
    """PTBLexer's SENTEND after a token ending at `pos`: the end of the text,
    or a space followed by a space or an upper-case letter. (At the end of a
    caption the Java tokenizer actually looks at the first character of the
    next caption in its batch file; this treats the end as a sentence end.)"""
    rest = text[pos:]
    if rest.strip() == "":
        return True
    return rest[0].isspace() and (rest[1].isspace() or rest[1].isupper())


def _ptb_token(match: re.Match[str], text: str) -> list[str]:
    """The output token(s), before lower-casing, for one lexer match."""
    kind, token = match.lastgroup, match.group()
    if kind == "space":
        return []
    if kind == "ellipsis":
        return ["..."]
    if kind == "dashes":
        return ["--"]
    if kind == "acronym" and len(token) == 2 and _at_sentence_end(text, match.end()):
        return [token[0], "."]  # "a." ending a sentence: PTBLexer's processAcronym
    opening = match.start() == 0 or text[match.start() - 1].isspace() or (
        text[match.start() - 1] in _OPENING_CONTEXT
    )
    if kind == "dquote":
        return ["``" if opening else "''"]
    if kind == "squote" and token == "'" and opening:
        return ["`"]
    if kind == "other" and token in _BRACKETS:
        return [_BRACKETS[token]]
    return [token]


def ptb_tokenize(text: str) -> list[str]:
    """Approximate Stanford PTBTokenizer (-lowerCase) in pure Python.

    pycocoevalcap runs stanford-corenlp-3.4.1 in Java on every caption before
    CIDEr; this reproduces it closely enough that CIDEr needs no Java. It
    lower-cases; splits off sentence punctuation; splits word-final periods
    unless the word is an abbreviation or acronym ("mr.", "u.s." stay whole);
    keeps internal ",", "." and ":" in numbers, and hyphenated, slashed and
    internal-apostrophe words whole ("t-shirt", "and/or", "o'clock"); splits
    clitics ("dog 's", "do n't", "ca n't") and "cannot"/"gonna"/...; turns
    quotes into `` '' ` ', brackets into -lrb- -rrb- -lsb- -rsb- -lcb- -rcb-,
    ellipses into "..." and dashes into "--"; keeps runs of "?"/"!", #hashtags
    and @names whole.

    Checked against the Java tokenizer: identical on 58 hand-written
    caption-like sentences and on about 95% of 1,500 random, punctuation-heavy
    ones. Not reproduced: URLs, e-mails, SGML, smileys, phone numbers,
    fractions, runs of curly quotes, tokens glued together without spaces,
    and a caption-final single letter with a period ("plan b."), which the
    Java lexer splits or not depending on the next caption in its batch.
    """
    text = text.replace("\n", " ").translate(_QUOTE_MAP)
    text = _ASSIMILATION.sub(_split_assimilation, text)
    text = _NT.sub(lambda m: " " + m.group(), text)
    text = _CLITIC.sub(lambda m: " " + m.group(), text)
    return [
        token.lower()
        for match in _PTB_TOKEN.finditer(text)
        for token in _ptb_token(match, text)
    ]


def tokenize_caption(text: str) -> str:
    """What pycocoevalcap's PTBTokenizer step returns for one caption: PTB
    tokens without the tokens in `PTB_PUNCTUATIONS`, joined by single spaces."""
    return " ".join(t for t in ptb_tokenize(text) if t not in PTB_PUNCTUATIONS)


# ---------------------------------------------------------------------------
# CIDEr-D (pycocoevalcap/cider/cider_scorer.py)
# ---------------------------------------------------------------------------

NGram = tuple[str, ...]
# Per-order tf-idf vectors, their L2 norms, and the sentence length.
TfIdf = tuple[list[dict[NGram, float]], list[float], int]
_CIDER_SCALE = 10.0


def _ngram_counts(sentence: str, max_n: int) -> Counter[NGram]:
    """`precook`: counts of all 1..max_n-grams of a whitespace-split sentence."""
    words = sentence.split()
    counts: Counter[NGram] = Counter()
    for k in range(1, max_n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _document_frequency(cooked_refs: Sequence[Sequence[Counter[NGram]]]) -> Counter[NGram]:
    """Number of images whose reference set contains each n-gram (refs only,
    from the corpus being scored, as `compute_doc_freq`)."""
    df: Counter[NGram] = Counter()
    for refs in cooked_refs:
        df.update({ngram for ref in refs for ngram in ref})
    return df


def _tfidf(
    counts: Counter[NGram], df: Counter[NGram], log_num_images: float, max_n: int
) -> TfIdf:
    """`counts2vec`: per-order tf-idf vectors, their L2 norms, and a length.

    idf = log(#images) - log(max(1, df)), so an n-gram absent from every
    reference gets the largest weight. The length is the number of *bigrams*
    (the official code tests the 0-based order index ``n == 1``), i.e. words
    minus one. Kept as written; it only changes the length difference when a
    sentence is empty, and an empty sentence scores 0 anyway.
    """
    vecs: list[dict[NGram, float]] = [{} for _ in range(max_n)]
    norms = [0.0] * max_n
    length = 0
    for ngram, term_freq in counts.items():
        order = len(ngram) - 1
        weight = float(term_freq) * (log_num_images - math.log(max(1.0, df[ngram])))
        vecs[order][ngram] = weight
        norms[order] += weight**2
        if order == 1:
            length += term_freq
    return vecs, [math.sqrt(v) for v in norms], length


def _clipped_cosine(hyp: TfIdf, ref: TfIdf, sigma: float) -> list[float]:
    """`sim`: per-order clipped cosine similarity times the Gaussian length
    penalty exp(-delta^2 / (2 sigma^2)).

    The "D" clipping uses min(hyp weight, ref weight) in the numerator, so
    repeating a reference word beyond its reference count earns nothing, while
    the norms are those of the unclipped vectors.
    """
    vec_hyp, norm_hyp, len_hyp = hyp
    vec_ref, norm_ref, len_ref = ref
    delta = float(len_hyp - len_ref)
    penalty = math.e ** (-(delta**2) / (2 * sigma**2))
    values = []
    for order, hyp_order in enumerate(vec_hyp):
        ref_order = vec_ref[order]
        value = 0.0
        for ngram, weight in hyp_order.items():
            ref_weight = ref_order.get(ngram, 0.0)
            value += min(weight, ref_weight) * ref_weight
        if norm_hyp[order] != 0 and norm_ref[order] != 0:
            value /= norm_hyp[order] * norm_ref[order]
        values.append(value * penalty)
    return values


def _check_cider_inputs(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> None:
    """Same ids on both sides and at least one reference each, as `Cider`
    asserts; a clear message instead of a bare assert."""
    if not predictions:
        raise ValueError("cider_d got no predictions.")
    pred_ids, ref_ids = set(predictions), set(references)
    if pred_ids != ref_ids:
        raise ValueError(
            "cider_d needs the same ids in predictions and references; "
            f"only in predictions: {sorted(map(str, pred_ids - ref_ids))[:5]}, "
            f"only in references: {sorted(map(str, ref_ids - pred_ids))[:5]}"
        )
    empty = [i for i, refs in references.items() if len(refs) == 0]
    if empty:
        raise ValueError(f"cider_d: ids with no reference captions, e.g. {empty[:5]}")


def cider_d(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    tokenize: bool = True,
    max_n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, dict[Hashable, float]]:
    """CIDEr-D as pycocoevalcap's `Cider().compute_score`, in percent.

    Returns ``(corpus_score, per_id_scores)``, both pycocoevalcap's values times
    100 (the scale of Flamingo's CIDEr columns). Per image: the mean over
    n = 1..4 of the clipped, length-penalised tf-idf cosine similarity to each
    reference, averaged over references, times 10. Document frequencies come
    from the references of exactly the images scored here, so the score of an
    image depends on the rest of the corpus (and is 0 for a one-image corpus,
    where every idf is log(1) - log(1) = 0). The corpus score is the mean over
    images.

    With ``tokenize=True`` every caption first goes through `tokenize_caption`,
    like COCOEvalCap does; pass False for captions that are already tokenised.
    """
    _check_cider_inputs(predictions, references)
    prepare = tokenize_caption if tokenize else (lambda s: s)
    ids = list(predictions)
    cooked_hyps = [_ngram_counts(prepare(predictions[i]), max_n) for i in ids]
    cooked_refs = [[_ngram_counts(prepare(r), max_n) for r in references[i]] for i in ids]
    df = _document_frequency(cooked_refs)
    log_num_images = math.log(float(len(ids)))
    per_image = []
    for hyp_counts, ref_counts in zip(cooked_hyps, cooked_refs):
        hyp = _tfidf(hyp_counts, df, log_num_images, max_n)
        totals = [0.0] * max_n
        for counts in ref_counts:
            sims = _clipped_cosine(hyp, _tfidf(counts, df, log_num_images, max_n), sigma)
            totals = [t + s for t, s in zip(totals, sims)]
        per_image.append(sum(totals) / max_n / len(ref_counts) * _CIDER_SCALE)
    per_id = {i: 100.0 * s for i, s in zip(ids, per_image)}
    return 100.0 * float(np.mean(per_image)), per_id


# ---------------------------------------------------------------------------
# ROC-AUC and top-1 accuracy
# ---------------------------------------------------------------------------


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    starts = ends - counts
    return ((starts + 1 + ends) / 2.0)[inverse.reshape(-1)]


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve, in percent (HatefulMemes' metric).

    Computed from ranks (the Mann-Whitney statistic): the probability that a
    random positive scores above a random negative, a tie counting one half.
    This equals the trapezoidal area under the ROC curve that scikit-learn's
    `roc_auc_score` reports, ties included. Labels must be 0/1 (or booleans)
    and both classes must be present, otherwise the AUC is undefined.
    """
    scores_arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels_arr = np.asarray(labels).reshape(-1)
    if scores_arr.shape != labels_arr.shape:
        raise ValueError(f"roc_auc: {scores_arr.size} scores but {labels_arr.size} labels.")
    if np.isnan(scores_arr).any():
        raise ValueError("roc_auc: scores contain NaN.")
    if not np.isin(labels_arr, (0, 1)).all():
        raise ValueError(f"roc_auc: labels must be 0/1, got {np.unique(labels_arr)[:5]}.")
    positive = labels_arr.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs at least one positive and one negative label.")
    ranks = _average_ranks(scores_arr)
    u_statistic = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return 100.0 * float(u_statistic / (n_pos * n_neg))


def _as_list(values: Sequence[Hashable] | np.ndarray) -> list[Hashable]:
    """Plain Python values, so numpy and list inputs compare the same way."""
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def top1_accuracy(
    predictions: Sequence[Hashable] | np.ndarray, targets: Sequence[Hashable] | np.ndarray
) -> float:
    """Fraction of exact matches, in percent (MSVD-QA, MSRVTT-QA, ImageNet...).

    `predictions` is either one predicted label per example (class ids or
    answer strings, compared with ==; post-process generated answers first) or
    a 2-D array of class scores, reduced with argmax over the last axis.
    """
    if isinstance(predictions, np.ndarray) and predictions.ndim == 2:
        predicted = predictions.argmax(axis=-1).tolist()
    else:
        predicted = _as_list(predictions)
    expected = _as_list(targets)
    if len(predicted) != len(expected):
        raise ValueError(
            f"top1_accuracy: {len(predicted)} predictions but {len(expected)} targets."
        )
    if not expected:
        raise ValueError("top1_accuracy got no examples.")
    correct = sum(p == t for p, t in zip(predicted, expected))
    return 100.0 * correct / len(expected)
