"""Trains Flamingo.

    python -m flamingo_jax.train --config=configs/tiny.py --workdir=workdirs/tiny
    python -m flamingo_jax.train --config=configs/80b.py --config.train.steps=1000 --workdir=gs://...

Running the same command again in the same workdir resumes from its latest
checkpoint (also after a SIGTERM, which saves before exiting).
"""

import os

from absl import flags, logging
from ml_collections import config_flags

from flamingo_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard events go here "
                               "(default: workdirs/<config name>).")


def main(argv):
    del argv
    import jax

    from flamingo_jax import runtime
    from flamingo_jax.core.config import RunConfig
    from flamingo_jax.training.trainer import Trainer

    config = _CONFIG.value
    RunConfig.from_config(config)  # a mistake in the config fails here, before any device is touched
    runtime.quiet_library_logs()
    runtime.enable_compilation_cache()
    if os.environ.get("FLAMINGO_DISTRIBUTED") == "1":  # set by launch/ on multi-host pods
        jax.distributed.initialize()
    if jax.process_index() != 0:  # process 0 narrates; the other hosts still log warnings and errors
        logging.set_verbosity(logging.WARNING)
    workdir = _WORKDIR.value or os.path.join("workdirs", config.name)
    logging.info("devices: %s; workdir %s", jax.devices(), workdir)
    trainer = Trainer(config, workdir)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    logging.info("finished at step %d%s", result.step, " (preempted)" if result.preempted else "")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    cli.run(main)
