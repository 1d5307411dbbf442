"""The training loop behind `python -m flamingo_jax.train`.

Order matters: every check a user can fail (model config, mesh, batch sizes,
backbone paths) runs before anything is compiled or allocated. Then the state
is initialised straight into its shardings (or restored from the latest
checkpoint in the workdir, on whatever mesh this run has), and the loop runs
with checkpoints every K steps, on SIGTERM (TPU preemption) and at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from flamingo_jax.core import backbones, flops, sharding
from flamingo_jax.core.checkpoint import (
    Checkpointer,
    absolute,
    abstract_with_shardings,
    gather_process_states,
    this_process_state,
)
from flamingo_jax.core.config import RunConfig, resume_changes
from flamingo_jax.core.parts import ModelParts
from flamingo_jax.data.mixture import Mixture
from flamingo_jax.errors import UserError
from flamingo_jax.models.partitioning import activation_sharding
from flamingo_jax.training import plots, programs
from flamingo_jax.training.metrics import MetricsWriter
from flamingo_jax.training.objectives import Objective, make_objective
from flamingo_jax.training.optimizer import check_weight_decay_exempt, learning_rate_schedule
from flamingo_jax.training.spike_guard import Spike, SpikeGuard
from flamingo_jax.training.state import TrainState, new_train_state
from flamingo_jax.training.step import make_train_step
from flamingo_jax.training.workdir_lock import NotAWorkdir, WorkdirLock


class TrainingStopped(UserError, RuntimeError):
    """Training gave up (e.g. too many non-finite steps); progress was saved first."""


@dataclasses.dataclass
class RunResult:
    step: int  # the last completed step
    preempted: bool
    losses: dict[int, float]


class _PreemptionFlag:
    """Set by SIGTERM; the loop saves a checkpoint and exits at the next step boundary."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting.")
        self.raised = True

    def raised_anywhere(self) -> bool:
        """Whether any process got SIGTERM. Hosts of a pod may not all be signalled: a host
        that stopped alone would leave the others waiting in a collective forever, so all
        agree (one tiny all-gather per step, only on several processes)."""
        if jax.process_count() == 1:
            return self.raised
        return bool(multihost_utils.process_allgather(np.int32(self.raised)).any())

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)


def prepare_synthetic_data(run: RunConfig) -> None:
    """Generates the project's synthetic corpus if the config uses it and it is absent
    (process 0 writes it; on several hosts the others wait for it)."""
    synthetic = run.synthetic
    if not synthetic.out_dir:
        return
    manifest = os.path.join(synthetic.out_dir, "manifest.json")
    if jax.process_index() == 0 and os.path.exists(manifest):
        _warn_if_corpus_differs(run)
    elif jax.process_index() == 0:
        from flamingo_jax.data import synthetic as synthetic_data

        logging.info("generating the synthetic corpus in %s ...", synthetic.out_dir)
        started = time.time()
        synthetic_data.generate(synthetic.out_dir, num_examples=synthetic.num_examples, num_eval=synthetic.num_eval,
                                image_size=synthetic.image_size, vocab_size=run.model.decoder.vocab_size,
                                seed=synthetic.seed)
        logging.info("synthetic corpus ready in %.1f s", time.time() - started)
    if jax.process_count() > 1:  # every process waits until process 0's corpus is complete
        multihost_utils.sync_global_devices("flamingo_jax: synthetic corpus ready")


def _warn_if_corpus_differs(run: RunConfig) -> None:
    """A corpus already there is used as it is (tests and shared corpora rely on that), but one
    written with other settings than the config's says so: an older corpus in the default
    directory would otherwise train a changed config on the old data without a word."""
    from flamingo_jax.data import synthetic as synthetic_data

    synthetic = run.synthetic
    differ = synthetic_data.settings_differ(synthetic.out_dir, num_examples=synthetic.num_examples,
                                            num_eval=synthetic.num_eval, image_size=synthetic.image_size,
                                            seed=synthetic.seed, vocab_size=run.model.decoder.vocab_size)
    if differ:
        listed = ", ".join(f"{k}={have} (config: {want})" for k, (have, want) in differ.items())
        logging.warning("the synthetic corpus in %s was generated with %s; it is used as it is. Delete the "
                        "directory to regenerate it from the config.", synthetic.out_dir, listed)


def check_curriculum(from_step: dict[str, int], steps: int) -> None:
    """The first step needs a dataset; one that joins after the last step is never trained on."""
    if from_step and min(from_step.values()) > 0:
        raise UserError(
            f"config field data.datasets: every dataset has from_step > 0 ({from_step}), so the first steps "
            "would have no data; set one dataset's from_step to 0.")
    late = {name: start for name, start in from_step.items() if start >= steps}
    if late:
        logging.warning("datasets %s join at from_step >= train.steps = %d: this run never trains on them.",
                        late, steps)


def jit_train_step(objective: Objective, parts: ModelParts, optimizer, weights, group: tuple[str, ...],
                   num_microbatches: int, state_shardings, frozen_shardings, batch_sharding) -> Callable:
    """The jitted step over the datasets in `group`, state donated (also what `flamingo_jax.aot` compiles).
    Trace it inside `activation_sharding(mesh, rules)`."""
    fn = make_train_step(objective, parts, optimizer, weights, group, num_microbatches)
    batch_shardings = {name: batch_sharding for name in group}
    return jax.jit(fn, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))


def _compile_init_state(optimizer, seed: int, abstract_params, param_shardings, state_shardings):
    """The compiled params -> TrainState (fresh optimizer state), laid out as the run's state."""
    init_state = jax.jit(lambda p: new_train_state(p, optimizer, seed), in_shardings=(param_shardings,),
                         out_shardings=state_shardings)
    return init_state.lower(abstract_with_shardings(abstract_params, param_shardings)).compile()


def _jit_random_weights(parts: ModelParts, resuming: bool, loaded: set[str], param_shardings, frozen_shardings):
    """seed -> (the trainable weights not in `loaded`, or None when resuming; the frozen ones not
    in `loaded`). A loaded component comes from its backbone checkpoint, frozen or (a trained LM)
    trainable, so it is never initialised."""
    def unloaded(tree):
        return {k: v for k, v in tree.items() if k not in loaded}

    def random_weights(seed):
        params, frozen = parts.init(seed)
        return (None if resuming else unloaded(params)), unloaded(frozen)

    return jax.jit(random_weights, static_argnums=0,
                   out_shardings=(None if resuming else unloaded(param_shardings), unloaded(frozen_shardings)))


class Trainer:
    """Builds everything a run needs; `run()` trains until `train.steps` or preemption."""

    def __init__(self, config, workdir: str, *, devices=None):
        self.config = config
        self.workdir = absolute(workdir)
        if "://" not in self.workdir and os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
            raise NotAWorkdir(f"--workdir={workdir} is a file, not a directory; give the folder the run writes its "
                              "checkpoints and metrics to (it is created if absent).")
        # ---- checks that need no compile
        self.run_config = run = RunConfig.from_config(config)
        train = run.train
        self.model_config = run.model
        self.mesh = sharding.make_mesh(dataclasses.asdict(run.mesh), devices)
        self.rules = sharding.rules_from_config(run.mesh_rules)
        # Flamingo reads its frozen backbones; a backbone's pretraining starts from scratch.
        self.backbone_paths = (backbones.check_paths(dataclasses.asdict(run.backbones))
                               if run.objective == "flamingo" else {})
        prepare_synthetic_data(run)
        self.mixture = Mixture.from_config(run.data, seed=run.seed)
        self.datasets = tuple(sorted(self.mixture.pipelines))
        check_curriculum({name: spec.from_step for name, spec in self.mixture.specs.items()}, train.steps)
        self.batch_sizes = {name: spec.batch_size * jax.process_count() for name, spec in self.mixture.specs.items()}
        sharding.check_batch_sizes(self.batch_sizes, self.mesh, train.microbatches)
        self._check_vocab()
        self.objective = make_objective(run, self.mixture.tokenizer)
        self.objective.check({name: spec.record_kind for name, spec in self.mixture.specs.items()})

        # ---- model, optimizer and shardings (abstract: nothing allocated yet)
        self.parts = self.objective.parts()
        self.schedule = learning_rate_schedule(train)
        abstract_params, abstract_frozen = self.parts.abstract()
        check_weight_decay_exempt(abstract_params, self.objective.weight_decay_exempt())  # a typo: before compiling
        self.param_shardings, self.frozen_shardings = sharding.weight_shardings(self.parts, self.mesh, self.rules)
        self.optimizer = sharding.optimizer_for(self.objective.optimizer(), abstract_params, self.param_shardings,
                                                self.mesh, run.optimizer_sharding)
        self.abstract_params, self.abstract_frozen = abstract_params, abstract_frozen
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self.abstract_state = jax.eval_shape(lambda p: new_train_state(p, self.optimizer, run.seed),
                                             abstract_params)
        self.state_shardings = sharding.state_shardings(self.abstract_state, self.param_shardings, self.optimizer,
                                                        self.mesh, run.optimizer_sharding)
        self.program_key = programs.run_key(config, self.mesh, self.mixture.tokenizer)
        self._step_programs: dict[tuple[str, ...], Callable] = {}  # per group of datasets
        self._init_state = programs.reuse(self.program_key, ("init_state",), functools.partial(
            _compile_init_state, self.optimizer, run.seed, abstract_params, self.param_shardings, self.state_shardings))
        self.guard = SpikeGuard(train.spike_guard)
        # ---- the workdir: one trainer at a time (process 0 holds the lock for the run)
        self.lock = None
        if jax.process_index() == 0 and "://" not in self.workdir:
            self.lock = WorkdirLock(self.workdir).acquire()
        try:
            self.checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=run.checkpoint.keep,
                                             every_steps=run.checkpoint.every_steps,
                                             async_save=run.checkpoint.async_save)
        except BaseException:
            self._release_lock()
            raise

    def _check_vocab(self) -> None:
        tokenizer = self.mixture.tokenizer
        if tokenizer is not None and tokenizer.vocab_size != self.model_config.decoder.vocab_size:
            raise ValueError(
                f"config field `model.decoder.vocab_size` = {self.model_config.decoder.vocab_size} but the "
                f"tokenizer {self.run_config.data.get('tokenizer')!r} has {tokenizer.vocab_size} pieces; they must match "
                "(<EOC> is the id right after the frozen vocabulary).")
        if tokenizer is not None and getattr(tokenizer, "num_new_tokens", 1) > self.model_config.num_new_tokens:
            raise ValueError(
                f"config field `model.num_new_tokens` = {self.model_config.num_new_tokens} but the tokenizer "
                f"{self.run_config.data.get('tokenizer')!r} adds {tokenizer.num_new_tokens} new ids (<EOC>, <image>) "
                f"after its vocabulary; set --config.model.num_new_tokens={tokenizer.num_new_tokens} so each has a "
                "trainable row.")

    # ------------------------------------------------------------------ state
    def initial_state(self) -> tuple[TrainState, Any, dict[str, Any]]:
        """(state, frozen weights, checkpoint meta or {}): restored if the workdir has a checkpoint.

        Only what is not restored is randomly initialised: XLA drops the unused
        outputs, so resuming does not initialise trainable weights and a frozen
        backbone loaded from its checkpoint is never initialised at all."""
        resuming = self.checkpointer.latest_step() is not None
        loaded = {backbones.COMPONENTS[name] for name in self.backbone_paths}

        init = programs.reuse(self.program_key, ("random_weights", resuming, tuple(sorted(loaded))), functools.partial(
            _jit_random_weights, self.parts, resuming, loaded, self.param_shardings, self.frozen_shardings))
        params, frozen = init(self.run_config.seed)
        frozen = backbones.load_into(frozen, self.abstract_frozen, self.frozen_shardings, self.backbone_paths)
        if not resuming:  # a backbone that trains (`model.freeze_lm` off) starts from its checkpoint
            params = backbones.load_into(params, self.abstract_params, self.param_shardings, self.backbone_paths,
                                         role="trainable")
            return self._init_state(params), frozen, {}
        latest = self.checkpointer.latest_step()
        try:
            meta = self.checkpointer.read_meta(latest)
        except Exception:  # noqa: BLE001 - a damaged record: restore_usable reports it and sets it aside
            meta = {}
        if meta.get("params_only"):  # a converted model (`convert openflamingo`): its weights, a fresh optimizer
            self._check_resumable(latest, meta)
            abstract_params = abstract_with_shardings(self.abstract_params, self.param_shardings)
            reader = Checkpointer(self.checkpointer.directory, async_save=False)  # its own handlers: saves are
            try:  # the train state's, this restore is a partial PyTree one
                state = self._init_state(reader.restore_params(abstract_params, latest))
            finally:
                reader.close()
            logging.info("starting from the converted weights of step %d in %s (new optimizer state)", latest,
                         self.checkpointer.directory)
            return state, frozen, meta
        state, meta = self.checkpointer.restore_usable(
            abstract_with_shardings(self.abstract_state, self.state_shardings), check_meta=self._check_resumable)
        self.guard.rollbacks = int(meta.get("rollbacks", 0))
        recorded = meta.get("backbones", {})
        if recorded != self.backbone_paths:
            logging.warning("resuming with backbones %s but the checkpoint was trained with %s",
                            self.backbone_paths, recorded)
        self.mixture.set_state(this_process_state(meta["data"]))
        logging.info("resumed from step %d in %s", int(state.step), self.checkpointer.directory)
        return state, frozen, meta

    def _check_resumable(self, step: int, meta: dict[str, Any]) -> None:
        """Before a checkpoint's arrays are read: its model and seed must be the run's (else a
        clear error naming the fields); other changed settings are reported."""
        changes = resume_changes(meta.get("config", {}), self.run_config, step)
        if changes:
            logging.warning("resuming step %d with changed settings: %s", step, "; ".join(changes))

    def _meta(self, state: TrainState, nonfinite_in_row: int) -> dict[str, Any]:
        return {
            "rollbacks": self.guard.rollbacks,
            "step": int(state.step),
            "data": gather_process_states(self.mixture.get_state()),  # one per process (each reads its shard)
            "config": json.loads(self.config.to_json_best_effort()),
            "backbones": self.backbone_paths,
            "skipped_records": self.mixture.skip_counts(),
            "nonfinite_in_row": nonfinite_in_row,
        }

    # ------------------------------------------------------------------ steps
    def step_group(self, step: int) -> tuple[str, ...]:
        """The datasets of the step after `step`: every one whose `from_step` it has reached, or
        under round-robin one of those in turn."""
        active = tuple(n for n in self.datasets if self.mixture.specs[n].from_step <= step)
        if self.run_config.train.accumulation == "all":
            return active
        return (active[step % len(active)],)

    def _step_program(self, group: tuple[str, ...]) -> Callable:
        """The jitted step over the datasets in `group`, built once per trainer (traced on its
        first call) and kept for the run's next trainer in this process (`programs.reuse`)."""
        if group not in self._step_programs:
            self._step_programs[group] = programs.reuse(self.program_key, ("train_step", group), functools.partial(
                jit_train_step, self.objective, self.parts, self.optimizer, self.mixture.weights, group,
                self.run_config.train.microbatches, self.state_shardings, self.frozen_shardings, self.batch_sharding))
        return self._step_programs[group]

    def _next_batches(self, group: tuple[str, ...]) -> dict[str, Any]:
        local = {name: next(self.mixture.pipelines[name]) for name in group}
        return {name: sharding.global_batch(batch, self.batch_sharding) for name, batch in local.items()}

    # ------------------------------------------------------------------ loop
    def run(self, after_step: Callable[[int], None] | None = None) -> RunResult:
        """Trains to `train.steps`. `after_step(step)` is called after each step (tests use it)."""
        train = self.run_config.train
        clock = time.time()
        state, frozen, meta = self.initial_state()
        start_step = int(state.step)
        logging.info("state ready at step %d in %.1f s", start_step, time.time() - clock)
        nonfinite_in_row = int(meta.get("nonfinite_in_row", 0))
        writer = MetricsWriter(self.workdir, train.steps, tensorboard=train.tensorboard)
        chip = flops.detect_chip()  # MFU is logged only where the chip's peak is known
        model_flops: dict[tuple[str, ...], float] = {}  # per group, from its first batches' shapes
        losses: dict[int, float] = {}
        started = time.time()
        pending = None  # the previous step's metrics, read after the next step is dispatched
        preempted = False

        def finish(step_metrics, step, step_time, tokens, group):
            nonlocal nonfinite_in_row
            scalars = dict(jax.device_get(step_metrics))
            scalars.update(learning_rate=float(self.schedule(step - 1)), tokens_per_s=tokens / max(step_time, 1e-9),
                           step_time=step_time)
            if group in model_flops:
                scalars["mfu"] = flops.mfu(model_flops[group], max(step_time, 1e-9), self.mesh.size, chip)
            scalars.update({f"skipped/{name}/{reason}": count for name, counts in self.mixture.skip_counts().items()
                            for reason, count in counts.items() if count})  # records and file damage, so far
            losses[step] = float(scalars["loss"])
            nonfinite_in_row = 0 if bool(scalars["finite"]) else nonfinite_in_row + 1
            if not bool(scalars["finite"]):
                logging.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)",
                                step, nonfinite_in_row)
            writer.write(step, scalars)
            if step % train.log_every == 0 or step == train.steps:
                writer.progress(step, scalars, step_time, started, start_step)
            return self.guard.observe(step, losses[step])

        with _PreemptionFlag() as preemption, activation_sharding(self.mesh, self.rules):
            step = start_step
            while True:
                stepping = step < train.steps and not preempted
                if stepping:
                    group = self.step_group(step)
                    batches = self._next_batches(group)
                    step_started = time.time()
                    state, step_metrics = self._step_program(group)(state, frozen, batches)
                    if step == start_step:
                        logging.info("first step (compile + run) took %.1f s", time.time() - step_started)
                    step += 1
                spike = finish(*pending) if pending is not None else None  # the previous step's metrics
                pending = None
                if spike is not None:  # the step just dispatched, if any, is dropped with the spike
                    state, step = self._roll_back(spike, writer)
                    continue
                if not stepping:
                    break
                tokens = sum(batch["tokens"].size for batch in batches.values())
                if chip is not None and group not in model_flops:
                    shapes = {name: flops.BatchShape.of(batch) for name, batch in batches.items()}
                    counted = self.objective.step_flops(shapes, train.microbatches)
                    if counted is not None:
                        model_flops[group] = counted.model
                pending = (step_metrics, step, time.time() - step_started, tokens, group)
                if after_step is not None:
                    after_step(step)
                if nonfinite_in_row >= train.max_nonfinite_steps:
                    finish(*pending)
                    pending = None
                    self.checkpointer.save(step, state, self._meta(state, nonfinite_in_row), force=True)
                    self.checkpointer.wait()
                    raise TrainingStopped(
                        f"{nonfinite_in_row} consecutive steps had a non-finite loss or gradient (updates were "
                        f"skipped); saved step {step} in {self.checkpointer.directory}. Lower "
                        "train.learning_rate or check the data, then rerun to resume.")
                if preemption.raised_anywhere():
                    preempted = True  # the next pass reads this step's metrics, then the loop ends
                elif self.checkpointer.manager.should_save(step):
                    self.checkpointer.save(step, state, self._meta(state, nonfinite_in_row))
        if self.checkpointer.latest_step() != step:
            self.checkpointer.save(step, state, self._meta(state, nonfinite_in_row), force=True)
        self.checkpointer.wait()
        writer.close()
        if preempted:
            logging.warning("preempted: saved step %d in %s; run the same command again to resume.",
                            step, self.checkpointer.directory)
        skipped = {name: {reason: n for reason, n in counts.items() if n}
                   for name, counts in self.mixture.skip_counts().items()}
        skipped = {name: counts for name, counts in skipped.items() if counts}
        if skipped:
            logging.info("records skipped so far, by dataset and reason: %s", skipped)
        if not preempted:
            self.exported = self.export(state, frozen)
            self.write_plot()
        self.last_state = state
        return RunResult(step=step, preempted=preempted, losses=losses)

    def _roll_back(self, spike: Spike, writer: MetricsWriter) -> tuple[TrainState, int]:
        """Restores the newest checkpoint from before `spike` began; the data stream stays where it
        is, so the batches that caused the spike are skipped. Checkpoints written during the spike
        are set aside. Returns the restored state and its step."""
        guard = self.run_config.train.spike_guard
        self.checkpointer.wait()
        before = [s for s in self.checkpointer.manager.all_steps() if s < spike.first_step]
        what = (f"loss spike at steps {spike.first_step}-{spike.last_step} (losses "
                f"{', '.join(f'{v:.3f}' for v in spike.losses)} > {guard.factor} x the running median "
                f"{spike.median:.3f})")
        if self.guard.rollbacks >= guard.max_rollbacks or not before:
            reason = (f"{self.guard.rollbacks} rollbacks already (train.spike_guard.max_rollbacks)" if before else
                      "no checkpoint from before it to roll back to (lower checkpoint.every_steps)")
            raise TrainingStopped(f"{what}; stopping: {reason}. The checkpoints in {self.checkpointer.directory} "
                                  "are intact; check the data or lower train.learning_rate, then rerun to resume.")
        target = max(before)
        for later in sorted(s for s in self.checkpointer.manager.all_steps() if s > target):
            self.checkpointer.set_aside(later)
        state, _ = self.checkpointer.restore(abstract_with_shardings(self.abstract_state, self.state_shardings),
                                             target)
        state = state.replace(lr_scale=state.lr_scale * guard.lr_scale)
        self.guard.rollbacks += 1
        self.guard.reset_run()
        writer.write(spike.last_step, {"rollback/to_step": target, "rollback/count": self.guard.rollbacks,
                                       "rollback/median_loss": spike.median, "rollback/spike_loss": max(spike.losses),
                                       "rollback/lr_scale": float(state.lr_scale)})
        logging.warning("%s: rolled back to step %d (rollback %d of at most %d), skipping the batches since; "
                        "learning rate x%.3g.", what, target, self.guard.rollbacks, guard.max_rollbacks,
                        float(state.lr_scale))
        return state, target

    def export(self, state: TrainState, frozen: Any) -> dict[str, str]:
        """Writes the backbones a pretraining objective produces, as the checkpoints that
        `config.backbones` reads: `<workdir>/backbones/<component>`. Returns {component: path}."""
        paths = {}
        for component, weights in self.objective.export(state.params, frozen).items():
            path = os.path.join(self.workdir, "backbones", component)
            backbones.save(path, weights)
            paths[component] = path
            logging.info("exported the pretrained %s to %s (config.backbones.%s)", component, path, component)
        return paths

    def write_plot(self) -> str | None:
        """`<workdir>/training.png`: loss curves and, for Flamingo, tanh(gate) per layer."""
        if jax.process_index() != 0:
            return None
        metrics_path = os.path.join(self.workdir, "metrics.jsonl")
        png_path = os.path.join(self.workdir, "training.png")
        title = f"{self.run_config.name} ({self.objective.name})"
        if not epath.Path(metrics_path).exists() or not plots.plot_training(metrics_path, png_path, title):
            return None
        logging.info("training curves: %s", png_path)
        return png_path

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def close(self) -> None:
        try:
            self.checkpointer.close()
            self.mixture.close()
        finally:
            self._release_lock()
