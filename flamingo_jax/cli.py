"""What every command-line entry point shares: usage on `--help`, one line per mistake.

* `run(main)` runs an absl program (flags defined on the global FLAGS): `--help`
  prints the module's usage; an unknown or malformed flag prints one error line
  and the usage, exit 2; a `UserError` raised by `main` prints one line, exit 1.
* `parse(flag_values, argv, usage)` does the same for a program with its own
  `FlagValues` (the data tools and subcommands), returning the remaining args.

`run` and `guard` also keep JAX off an absent TPU (`skip_absent_tpu`). Unexpected exceptions
are not caught: their traceback is what a bug report needs. Like `errors`, this
module imports nothing else of the package, so every layer's CLI may use it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags

from flamingo_jax.errors import UserError

# Where a TPU VM exposes its chips (v2-v5e: /dev/accel*; v5p, v6e: VFIO groups).
TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")
CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")
USAGE_EXIT = 2  # a command line that cannot be parsed
ERROR_EXIT = 1  # a UserError


def fail(message: str, usage: str | None = None, code: int = ERROR_EXIT) -> NoReturn:
    """Prints `error: <message>` (and the usage, if given) on stderr and exits."""
    print(f"error: {message}", file=sys.stderr)
    if usage:
        print(usage.strip(), file=sys.stderr)
    raise SystemExit(code)


def _one_line(error: BaseException) -> str:
    """The message on one line; a KeyError's (or one wrapped in another error's args) unquoted."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    if "Traceback (most recent call last)" in text:  # a config file that raised: its prefix and final line
        head, _, rest = text.partition("Traceback (most recent call last)")
        text = head.rstrip(": \n") + ": " + rest.strip().splitlines()[-1]
    return " ".join(text.split()) or type(error).__name__


def _main_module_usage() -> str:
    module = sys.modules.get("__main__")
    return (getattr(module, "__doc__", None) or "").strip()


def skip_absent_tpu() -> None:
    """Leaves JAX's TPU backend out where there is no TPU.

    libtpu is installed for ahead-of-time compilation (the `tpu` and `test` extras), and
    with it JAX probes for a TPU at start-up and prints libtpu's initialisation errors on
    every machine without one. Unless the user chose platforms (JAX_PLATFORMS), a machine
    without TPU device files gets the GPU (where a CUDA plugin is installed) and the CPU.
    Must run before JAX initialises its backends (the CLIs import JAX's users in main); it sets
    the environment variable too, so a JAX imported later (a data tool's) and the processes a
    command starts read the same choice."""
    if os.environ.get("JAX_PLATFORMS") is not None or any(glob.glob(p) for p in TPU_DEVICE_FILES):
        return
    cuda = any(importlib.util.find_spec(name) is not None for name in CUDA_PLUGINS)
    os.environ["JAX_PLATFORMS"] = platforms = "cuda,cpu" if cuda else "cpu"
    if "jax" in sys.modules:  # read JAX_PLATFORMS when it was imported: tell its config instead
        sys.modules["jax"].config.update("jax_platforms", platforms)


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
    """`absl.app.run(main)` with one-line errors for bad flags and `UserError`s."""

    def parse_flags(args: list[str]) -> list[str]:
        try:
            return flags.FLAGS(args)
        # ml_collections raises KeyError/AttributeError/TypeError for a bad --config.<field> override.
        except flags.Error as error:
            fail(f"{_one_line(error)} (see --help)", _main_module_usage(), USAGE_EXIT)
        except (KeyError, AttributeError, TypeError, ValueError) as error:
            fail(f"a --config.<field> override: {_one_line(error)}", _main_module_usage(), USAGE_EXIT)

    def guarded_main(args: list[str]) -> Any:
        skip_absent_tpu()
        try:
            return main(args)
        except UserError as error:
            fail(_one_line(error))
        except OSError as error:
            # ml_collections defers a config file's load failure to the first read of its flag.
            if "Configuration is not available" not in str(error):
                raise
            fail(f"cannot load the config: {str(error).strip().splitlines()[-1].strip()}")

    app.run(guarded_main, argv=None if argv is None else list(argv), flags_parser=parse_flags)


def parse(flag_values: flags.FlagValues, argv: Sequence[str], usage: str) -> list[str]:
    """Parses `argv` into a program's own `flag_values`; `--help` prints `usage` and the flags."""
    if any(arg in ("-h", "--help", "-help", "--helpfull", "--helpshort") for arg in argv[1:]):
        print(usage.strip())
        print(flag_values.get_help())
        raise SystemExit(0)
    try:
        return flag_values(list(argv))
    except flags.Error as error:
        fail(f"{_one_line(error)} (see --help)", usage, USAGE_EXIT)


def guard(main: Callable[[], int | None]) -> int:
    """Runs `main()`, printing a `UserError` as one line (exit 1); returns main's exit code."""
    skip_absent_tpu()
    try:
        return int(main() or 0)
    except UserError as error:
        fail(_one_line(error))
