"""Where does tiny Flamingo's few-shot learning stop? Probes a recipe workdir (the README's main job)
from the LM's in-context recall up to the held-out tasks, each as rank accuracy (the mean
log-probability per token of each candidate answer, the highest taken), so that a score shows
whether the model picks the answer the prompt's images call for rather than how well it writes:

  lm_drills       the LM stage's decoder alone on held-out drill rows: copying (runs said twice)
                  and recall (keys bound to values, with or without frame pieces between them,
                  `data/repeats.py`); `first` is a value's first token, the one only a lookup by
                  its key predicts (for copying, a second saying's first token, which nothing
                  predicts: a run's end is not marked)
  lm_added_keys   the same LM when a row's keys are not tokens of their own but each key's embedding
                  is added to the input of the piece just before its value (one frame piece), what
                  an xattn block before layer 0 could write from an image; beside it the key as a
                  token followed by that frame piece, and the key added before later LM layers
  learned_keys    (--learned_keys_steps) the same rows with linear writes of the key, trained with
                  the LM frozen, before each LM layer: whether a later block could write a key the
                  LM uses if it found the right one, not only the raw embedding
  frame_keys      the same LM on text-only prompts in the held-out and training frames with the
                  image's attribute words added to each example's tokens: how well the frozen LM
                  would look names up if the first xattn block wrote the ideal key
  text_recall     the Flamingo engine on text-only prompts that bind colour words to made-up names
                  in a frame and ask one back: keyed recall in words, as a few-shot prompt needs it;
                  again with every xattn gate at 0 (`text_recall_gates_shut`), which is the frozen
                  LM alone: the dense blocks' FFWs act on every token, text-only ones too
  naming          fresh naming episodes like the training documents (`synthetic.naming_episode`:
                  3 values of one attribute, made-up names, 5 images, then a 6th to name)
  claims          fresh claim episodes like the training documents (`synthetic.claim_episode`'s
                  frames: 4 images with a claim and its answer, then a 5th claim to judge), as the
                  ROC-AUC of "yes" over "no": whether the model checks a claim against its image
  held_out        the held-out VQA and captioning families ranked among their names at 0, 4 and 8
                  shots, and how often the query's answer is among the support examples at all
  gates           tanh of each xattn block's attention and dense gates

    python bench/few_shot_probe.py --workdir=workdirs/tiny --json=bench/results/few_shot_probe.json
"""

from __future__ import annotations

import argparse
import os

import common

FRAMES = {  # text_recall: {k} a colour word, {v} a name with its leading space
    "key before name": "{k}{v}.",
    "key, then frame words": "Key: {k}. Value:{v}.",
    "training naming frame": "This {k} shape is a{v}.",
}


def _mean_per_token_choice(engine, prompts, candidates) -> list[int]:
    """Index of the best candidate per prompt by mean log-probability per token (with <EOC>)."""
    import numpy as np

    from flamingo_jax.inference import prompting

    scores = np.stack(engine.score(prompts, candidates, batch_size=8))
    lengths = np.array([[len(prompting.continuation_ids(p, c, engine.tokenizer)) + 1 for c in row]
                        for p, row in zip(prompts, candidates)])
    return list((scores / lengths).argmax(-1))


class FrozenLM:
    """The LM stage's decoder, loaded once: next-token log-probabilities from tokens [B, T] plus
    vectors [B, T, D] added to the residual stream before LM layer `layer` (0: to the input
    embeddings), one compiled program per layer and row shape."""

    def __init__(self, lm_workdir: str):
        import numpy as np

        from flamingo_jax.data import repeats
        from flamingo_jax.data.tokenizer import load_tokenizer
        from flamingo_jax.evaluation.backbone_checks import load_pretraining_run

        run = load_pretraining_run(lm_workdir)
        self.decoder, self.vocab = run.model, run.run.model.decoder.vocab_size
        self.num_layers = run.run.model.decoder.num_layers
        self.tokenizer = load_tokenizer(run.run.data["tokenizer"])
        self.ids = repeats.ordinary_ids(self.tokenizer.vocab_size, self.tokenizer.special_ids())
        self.table = np.asarray(self.decoder.embedding[...])[:self.vocab]  # the input embeddings
        self._programs: dict = {}

    def log_probs_fn(self, layer: int):
        """The pure function (tokens [B, T], added [B, T, D]) -> log-probabilities [B, T, V], the
        vectors added before LM layer `layer`: differentiable in `added`, for `learned_keys`."""
        import jax
        import jax.numpy as jnp

        from flamingo_jax.models.decoder import default_positions, uncached_slots

        decoder, vocab, num_layers = self.decoder, self.vocab, self.num_layers

        def run(x, positions, slots, keys, start, stop):
            if stop == start:
                return x
            x, _ = decoder.run_layers(x, positions, slots, layer_indices=jnp.arange(start, stop),
                                      position_keys=None if keys is None else keys[start:stop])
            return x

        def log_probs(tokens, added):
            positions, valid = default_positions(tokens, None, jnp.ones_like(tokens, bool))
            slots, keys = uncached_slots(positions, valid), decoder.position_keys(tokens.shape[1])
            x = run(decoder.embed(tokens), positions, slots, keys, 0, layer)
            x = run(x + added, positions, slots, keys, layer, num_layers)
            embedding = decoder.output_embedding()
            logits = decoder.final_norm(x) @ (embedding.T if embedding.shape[0] == vocab else embedding)
            return jax.nn.log_softmax(logits[..., :vocab])

        return log_probs

    def _program(self, layer: int):
        if layer not in self._programs:
            import jax

            self._programs[layer] = jax.jit(self.log_probs_fn(layer))
        return self._programs[layer]

    def log_probs(self, tokens, added=None, layer: int = 0):
        import numpy as np

        tokens = np.asarray(tokens, np.int32)
        if added is None:
            added = np.zeros((*tokens.shape, self.table.shape[1]), np.float32)
        return np.asarray(self._program(layer)(tokens, added))

    def predict(self, tokens, added=None, layer: int = 0):
        return self.log_probs(tokens, added, layer).argmax(-1)


ROW_LEN = 128  # every LM probe row: one compiled shape


def lm_drills(lm: FrozenLM, rows: int = 32) -> dict:
    import numpy as np

    from flamingo_jax.data import repeats

    results = {}
    for label, drill, settings in (("copy, runs of 10-40", "copy", dict(min_run=10, max_run=40)),
                                   ("recall, 2-4 keys, values of 1-3", "recall", dict(min_run=1, max_run=3, max_keys=4)),
                                   ("recall, 2-6 keys, values of 2-3", "recall", dict(min_run=2, max_run=3, max_keys=6)),
                                   ("recall, 2-6 keys, values of 1-3, frames of 0-4", "recall",
                                    dict(min_run=1, max_run=3, max_keys=6, max_frame_len=4))):
        pipeline = repeats.RepeatsPipeline("probe", rows, lm.ids, max_len=ROW_LEN, bos_id=lm.tokenizer.bos_id,
                                           drill=drill, seed=999, **settings)  # a seed no training run uses
        batch = next(pipeline)
        hit = lm.predict(batch["tokens"]) == batch["targets"]
        scored = batch["loss_mask"] > 0
        first = scored & ~np.pad(scored, ((0, 0), (1, 0)))[:, :-1]
        results[label] = {"accuracy": float(hit[scored].mean()), "first": float(hit[first].mean()),
                          "rest": float(hit[scored & ~first].mean()), "chance": 1 / len(lm.ids)}
    return results


def _keyed_rows(lm: FrozenLM, rng, rows: int, num_keys: int, key_as_token: bool):
    """Recall rows whose items are [key token,] one frame piece, then a 2-token value: tokens
    [rows, ROW_LEN]; each item's key embedding on its frame piece and value tokens [rows, ROW_LEN, D];
    each position's role (1 the frame piece, 2 a value token, 0 else); and the lookups (row, frame
    piece's position, value's first token), items whose key came before."""
    import numpy as np

    batch_tokens, batch_keys, batch_roles, lookups = [], [], [], []
    for row in range(rows):
        keys = rng.choice(lm.ids, num_keys, replace=False)
        others = np.setdiff1d(lm.ids, keys)
        frame = int(rng.choice(others))
        values = [rng.choice(others, 2).tolist() for _ in keys]
        tokens, said = [int(lm.tokenizer.bos_id)], set()
        key_rows = np.zeros((ROW_LEN + 3, lm.table.shape[1]), np.float32)
        roles = np.zeros(ROW_LEN + 3, np.int32)
        while len(tokens) < ROW_LEN:
            i = int(rng.integers(0, num_keys))
            if key_as_token:
                tokens.append(int(keys[i]))
            at = len(tokens)
            key_rows[at:at + 3], roles[at], roles[at + 1:at + 3] = lm.table[keys[i]], 1, 2
            tokens.append(frame)
            if i in said and at < ROW_LEN - 1:
                lookups.append((row, at, values[i][0]))
            tokens += values[i]
            said.add(i)
        batch_tokens.append(tokens[:ROW_LEN])
        batch_keys.append(key_rows[:ROW_LEN])
        batch_roles.append(roles[:ROW_LEN])
    return np.array(batch_tokens, np.int32), np.stack(batch_keys), np.stack(batch_roles), lookups


def _lookup_accuracy(predicted, lookups) -> float:
    import numpy as np

    return float(np.mean([predicted[row, at] == value for row, at, value in lookups]))


def lm_added_keys(lm: FrozenLM, rows: int = 32, num_keys: int = 4) -> dict:
    import numpy as np

    rng = np.random.default_rng(11)

    def accuracy(key_as_token: bool, scale: float = 1.0, layer: int = 0) -> float:
        tokens, keys, roles, lookups = _keyed_rows(lm, rng, rows, num_keys, key_as_token)
        added = np.zeros_like(keys) if key_as_token else scale * keys * (roles == 1)[..., None]
        return _lookup_accuracy(lm.predict(tokens, added, layer), lookups)

    results = {"key token, then one frame piece": accuracy(True)}
    for scale in (0.5, 1.0, 2.0):
        results[f"key embedding x{scale} added to the frame piece"] = accuracy(False, scale)
    for layer in range(1, lm.num_layers):  # a block before a later layer writes there instead
        results[f"key embedding x1 added to the frame piece before LM layer {layer}"] = accuracy(False, 1.0, layer)
    return {name: {"accuracy": value, "chance": 1 / len(lm.ids)} for name, value in results.items()}


def learned_keys(lm: FrozenLM, steps: int, rows: int = 32, num_keys: int = 4) -> dict:
    """Whether any linear write of the key, not only its raw embedding, is a key the LM looks up by
    when added before a later layer: two maps [D, D] (one for the frame piece, one for the value
    tokens, as a block writes something at every token after its image) trained by Adam with the LM
    frozen, from the raw embedding (the frame piece's map the identity, the values' 0), on the
    first value token's loss at each lookup; the accuracy on held-out rows before and after."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    results = {}
    for layer in range(lm.num_layers):
        log_probs = lm.log_probs_fn(layer)
        dim = lm.table.shape[1]

        def added(maps, keys, roles):
            return (jnp.where((roles == 1)[..., None], keys @ maps["frame piece"], 0.0)
                    + jnp.where((roles == 2)[..., None], keys @ maps["values"], 0.0))

        def loss(maps, tokens, keys, roles, targets, scored):
            chosen = jnp.take_along_axis(log_probs(tokens, added(maps, keys, roles)), targets[..., None], -1)[..., 0]
            return -(chosen * scored).sum() / scored.sum()

        optimizer = optax.adam(3e-3)

        @jax.jit
        def step(maps, opt_state, tokens, keys, roles, targets, scored):
            value, grads = jax.value_and_grad(loss)(maps, tokens, keys, roles, targets, scored)
            updates, opt_state = optimizer.update(grads, opt_state, maps)
            return optax.apply_updates(maps, updates), opt_state, value

        predict = jax.jit(lambda maps, tokens, keys, roles: log_probs(tokens, added(maps, keys, roles)).argmax(-1))
        maps = {"frame piece": jnp.eye(dim), "values": jnp.zeros((dim, dim))}
        opt_state = optimizer.init(maps)
        held_out = _keyed_rows(lm, np.random.default_rng(17), rows, num_keys, False)
        before = _lookup_accuracy(np.asarray(predict(maps, *held_out[:3])), held_out[3])
        rng = np.random.default_rng(19)
        for _ in range(steps):
            tokens, keys, roles, lookups = _keyed_rows(lm, rng, rows, num_keys, False)
            targets, scored = np.zeros(tokens.shape, np.int32), np.zeros(tokens.shape, np.float32)
            for row, at, first in lookups:  # every lookup, in the rows' own shape: one program
                targets[row, at], scored[row, at] = first, 1.0
            maps, opt_state, value = step(maps, opt_state, tokens, keys, roles, targets, scored)
        after = _lookup_accuracy(np.asarray(predict(maps, *held_out[:3])), held_out[3])
        results[f"learned write before LM layer {layer}"] = {
            "accuracy before": before, "accuracy after": after, "last loss": float(value), "steps": steps,
            "chance": 1 / len(lm.ids)}
    return results


KEYED_FRAMES = {  # frame_keys: (frame, attribute whose word is the key, held-out names or None: made up)
    "held-out captioning": ("Output: {a} {colour} {name}.", "kind", "shape"),
    "held-out VQA": ("Question: What paper is it drawn on? Answer: {name}.", "texture", "texture"),
    "training naming": ("This is {a} {name}.", "kind", None),
}
FRAME_ROW_LEN, FRAME_BATCH = 256, 48


def frame_keys(lm: FrozenLM, count: int) -> dict:
    """Rank accuracy of the LM alone on text-only few-shot prompts in the real frames, 5 examples
    then a 6th with each of 3 names, when word embeddings (what an ideal first xattn block would
    write from the image) are added to each example's tokens. `where`: none; the attribute's word
    from the token before the name to its end, or on every token; or on every token the words of
    all three of the image's attributes (colour, kind, texture) summed, which is what a block
    before layer 0 can write: its queries are the token embeddings alone, the same in every
    task, so it cannot pick the attribute a task asks about. The LM has no <EOC>: examples follow
    each other."""
    import numpy as np

    from flamingo_jax.data import synthetic

    tokenizer, table = lm.tokenizer, lm.table
    held_names = {"shape": synthetic.HELD_OUT_SHAPE_NAMES, "texture": synthetic.HELD_OUT_TEXTURE_NAMES}
    populations = {"kind": synthetic.SHAPES, "texture": synthetic.TEXTURES, "colour": tuple(synthetic.COLOURS)}
    results = {}
    for label, (frame, attribute, held) in KEYED_FRAMES.items():
        rng = np.random.default_rng(13)
        episodes = []
        for _ in range(count):
            population = populations[attribute]
            values = [population[int(i)] for i in rng.permutation(len(population))[:3]]
            names = [held_names[held][v] for v in values] if held else synthetic.made_up_names(rng, 3)
            shown = [int(i) for i in rng.permutation(3)] + [int(i) for i in rng.integers(0, 3, 3)]
            colours = [str(rng.choice(list(synthetic.COLOURS))) for _ in shown]
            others = [[colour] + [str(rng.choice(populations[a])) for a in ("kind", "texture") if a != attribute]
                      for colour in colours]  # the image's other attributes
            episodes.append((values, names, shown, colours, others))
        for where in ("none", "name", "all", "all, every attribute"):
            rows, added, spans = [], [], []
            for values, names, shown, colours, others in episodes:
                for candidate in range(3):
                    tokens = [tokenizer.bos_id]
                    extra = np.zeros((FRAME_ROW_LEN, table.shape[1]), np.float32)
                    for n, (i, colour, other) in enumerate(zip(shown, colours, others)):
                        name = names[candidate] if n == len(shown) - 1 else names[i]
                        tokens += list(tokenizer.image_marker_ids)
                        start = len(tokens)
                        fill = dict(a=synthetic.article(name), colour=colour)
                        head = len(tokenizer.encode(frame.split("{name}")[0].format(**fill).rstrip()))
                        text = tokenizer.encode(frame.format(name=name, **fill))
                        words = [values[i]] + (other if where == "all, every attribute" else [])
                        key = sum(table[tokenizer.encode(word)[0]] for word in words)  # each word one piece
                        if where != "none":
                            extra[(start + head - 1 if where == "name" else start):start + len(text)] += key
                        tokens += text
                    if len(tokens) > FRAME_ROW_LEN:
                        raise ValueError(f"frame_keys: a {label} row has {len(tokens)} tokens, over {FRAME_ROW_LEN}.")
                    rows.append(tokens + [tokenizer.bos_id] * (FRAME_ROW_LEN - len(tokens)))
                    added.append(extra)
                    spans.append((start + head - 1, text[head:]))
            padding = -len(rows) % FRAME_BATCH  # every batch one shape: one compiled program
            rows, added = rows + rows[-1:] * padding, added + added[-1:] * padding
            log_probs = np.concatenate([lm.log_probs(rows[k:k + FRAME_BATCH], np.stack(added[k:k + FRAME_BATCH]))
                                        for k in range(0, len(rows), FRAME_BATCH)])
            scores = np.array([np.mean([log_probs[r, at + j, t] for j, t in enumerate(name_tokens)])
                               for r, (at, name_tokens) in enumerate(spans)]).reshape(count, 3)
            gold = np.array([episode[2][-1] for episode in episodes])
            results[f"{label}, key added: {where}"] = {"accuracy": float(np.mean(scores.argmax(-1) == gold)),
                                                       "chance": 1 / 3}
    return results


def text_recall(engine, count: int) -> dict:
    import numpy as np

    from flamingo_jax.data import synthetic
    from flamingo_jax.inference.items import END_OF_CHUNK

    rng = np.random.default_rng(0)
    colours = list(synthetic.COLOURS)
    results = {}
    for label, frame in FRAMES.items():
        for pairs in (2, 4):
            prompts, candidates, gold = [], [], []
            for _ in range(count):
                keys = [colours[i] for i in rng.permutation(len(colours))[:pairs]]
                names = synthetic.made_up_names(rng, pairs)
                items = []
                for i in rng.permutation(pairs):
                    items += [frame.format(k=keys[i], v=" " + names[i]), END_OF_CHUNK]
                asked = int(rng.integers(0, pairs))
                head = frame.split("{v}")[0].format(k=keys[asked])
                items.append(head)
                tail = frame.split("{v}")[1]
                prompts.append(items)
                candidates.append([" " + name + tail for name in names])
                gold.append(asked)
            chosen = _mean_per_token_choice(engine, prompts, candidates)
            results[f"{label}, {pairs} pairs"] = {"accuracy": float(np.mean(np.array(chosen) == gold)),
                                                  "chance": 1 / pairs}
    return results


def naming(engine, count: int) -> dict:
    import numpy as np

    from flamingo_jax.data import synthetic
    from flamingo_jax.inference.items import END_OF_CHUNK, Media

    rng = np.random.default_rng(5)
    size = engine.cfg.vision.image_size
    results = {}
    for attribute, population in (("kind", synthetic.SHAPES), ("texture", synthetic.TEXTURES),
                                  ("colour", tuple(synthetic.COLOURS))):
        prompts, candidates, gold = [], [], []
        for _ in range(count):
            values = [population[int(i)] for i in rng.permutation(len(population))[:3]]
            names = synthetic.made_up_names(rng, 3)
            shown = [int(i) for i in rng.permutation(3)] + [int(i) for i in rng.integers(0, 3, 2)]  # each at least once
            asked = int(rng.integers(0, 3))
            items = []
            for i in shown:
                scene = synthetic.scene_with(rng, attribute, values[i])
                items += [Media(array=synthetic.render(scene, size)),
                          f"This is {synthetic.article(names[i])} {names[i]}.", END_OF_CHUNK]
            items += [Media(array=synthetic.render(synthetic.scene_with(rng, attribute, values[asked]), size)), "This is"]
            prompts.append(items)
            candidates.append([f" {synthetic.article(n)} {n}." for n in names])
            gold.append(asked)
        chosen = _mean_per_token_choice(engine, prompts, candidates)
        results[attribute] = {"accuracy": float(np.mean(np.array(chosen) == gold)), "chance": 1 / 3}
    return results


def claims(engine, count: int) -> dict:
    import numpy as np

    from flamingo_jax.data import synthetic
    from flamingo_jax.evaluation.metrics import roc_auc
    from flamingo_jax.inference.items import END_OF_CHUNK, Media

    rng = np.random.default_rng(7)
    size = engine.cfg.vision.image_size
    results = {}
    for frame in synthetic.CLAIM_FRAMES:
        head, _ = frame.split("{answer}")
        prompts, labels = [], []
        for _ in range(count):
            items = []
            for k in range(5):
                scene = synthetic.random_scene(rng)
                holds = bool(rng.random() < 0.5)
                colour, kind = synthetic.verification_claim(scene, rng, false=not holds)
                text = head.format(a=synthetic.article(colour), colour=colour, kind=kind).rstrip()
                items += [Media(array=synthetic.render(scene, size)), text]
                items += [f" {'yes' if holds else 'no'}.", END_OF_CHUNK] if k < 4 else []
            prompts.append(items)
            labels.append(int(holds))
        scores = np.stack(engine.score(prompts, [[" yes.", " no."]] * count, batch_size=8))
        results[frame] = {"roc_auc": float(roc_auc(scores[:, 0] - scores[:, 1], labels)), "chance": 50.0}
    return results


def held_out(engine, count: int) -> dict:
    from pathlib import Path

    import numpy as np

    from flamingo_jax.data import synthetic
    from flamingo_jax.evaluation import support as support_lib
    from flamingo_jax.evaluation.tasks import get_task
    from flamingo_jax.evaluation.templates import build_prompt

    data_dir = Path(engine.run_config.synthetic.out_dir)
    families = {
        "synthetic_vqa": (sorted(synthetic.HELD_OUT_TEXTURE_NAMES.values()), lambda e: e.answers[0],
                          lambda e, name: f" {name}."),
        "synthetic_captioning": (sorted(synthetic.HELD_OUT_SHAPE_NAMES.values()),
                                 lambda e: e.captions[0].rstrip(".").split()[-1],
                                 lambda e, name: " " + " ".join(e.captions[0].split()[:-1]) + f" {name}."),
    }
    results = {}
    for task_name, (names, answer_of, candidate) in families.items():
        task = get_task(task_name)
        pool, queries = task.load(data_dir)
        queries = support_lib.sample_queries(queries, count, 1)
        for shots in (0, 4, 8):
            rng = np.random.default_rng([0, shots])
            prompts, candidates, gold, shown = [], [], [], []
            for query in queries:
                support = support_lib.random_support(pool, shots, rng) if shots else []
                zero_shot = [] if shots else support_lib.zero_shot_examples(pool, rng)
                prompts.append(build_prompt(task.template, support, query, zero_shot_text_only=zero_shot))
                candidates.append([candidate(query, name) for name in names])  # captions: the query's words, each name
                gold.append(names.index(answer_of(query)))
                shown.append(any(answer_of(s) == answer_of(query) for s in support))
            chosen = np.array(_mean_per_token_choice(engine, prompts, candidates))
            right, shown = chosen == np.array(gold), np.array(shown)
            results[f"{task_name}, {shots} shots"] = {
                "accuracy": float(right.mean()), "chance": 1 / len(names),
                "answer_in_support": float(shown.mean()),
                "accuracy_where_shown": float(right[shown].mean()) if shown.any() else None}
    return results


def gates(engine) -> dict:
    """{block: {attention, dense}}: tanh of each xattn block's gates, in the LM's layer order."""
    import re

    import jax
    import numpy as np

    found: dict = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(engine.layer_states):
        name = jax.tree_util.keystr(path)
        match = re.search(r"xattn\[(\d+)\].*?(attention|ffw)_gate", name)
        if match:
            which = "attention" if match.group(2) == "attention" else "dense"
            found.setdefault(f"block {match.group(1)}", {})[which] = float(np.tanh(np.asarray(leaf)))
    return found


def shut_gates(engine) -> None:
    """Every xattn gate of the engine's weights set to 0, in place: the frozen LM alone."""
    import jax
    import jax.numpy as jnp

    def shut(path, leaf):
        return jnp.zeros_like(leaf) if "gate" in jax.tree_util.keystr(path) else leaf

    engine.layer_states = jax.tree_util.tree_map_with_path(shut, engine.layer_states)
    engine.state = jax.tree_util.tree_map_with_path(shut, engine.state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdirs/tiny", help="the recipe's workdir (lm/ and flamingo/ in it)")
    parser.add_argument("--queries", type=int, default=60, help="prompts per probe row")
    parser.add_argument("--learned_keys_steps", type=int, default=0,
                        help="Adam steps of the learned_keys probe per layer (0: skip it; 200 add ~6 min)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from flamingo_jax import runtime
    from flamingo_jax.inference.engine import Engine

    runtime.quiet_library_logs()
    result = {"machine": common.machine(), "workdir": os.path.abspath(args.workdir), "queries": args.queries}
    lm = FrozenLM(os.path.join(args.workdir, "lm"))
    result.update(lm_drills=lm_drills(lm), lm_added_keys=lm_added_keys(lm),
                  frame_keys=frame_keys(lm, 3 * args.queries))  # the LM alone is cheap: less noise
    if args.learned_keys_steps:
        result["learned_keys"] = learned_keys(lm, args.learned_keys_steps)
    engine = Engine.from_workdir(os.path.join(args.workdir, "flamingo"))
    result.update(gates=gates(engine), text_recall=text_recall(engine, args.queries),
                  naming=naming(engine, args.queries), claims=claims(engine, args.queries),
                  held_out=held_out(engine, args.queries))
    shut_gates(engine)
    result["text_recall_gates_shut"] = text_recall(engine, args.queries)
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
