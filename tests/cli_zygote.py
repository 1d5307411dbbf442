"""`python -m <module> <args>` many times over without paying Python's and the libraries' start-up
each time (about 1.5 s a case here, 4 s with TensorFlow): started once by `tests/test_cli.py`, this
process imports the libraries the CLIs use (JAX, Flax, optax, orbax, TensorFlow), then forks one
child per command line, which runs the module as `__main__` exactly as `python -m` does. Nothing of
the package is imported before the fork (a module run as `__main__` must define its absl flags
itself, once), and no JAX backend or TensorFlow runtime is started (importing them starts no
thread), so forking is safe.

Protocol, one JSON object a line: stdin {"module", "args", "timeout"} -> stdout {"returncode",
"stdout", "stderr"} (returncode -9 when the child ran past its timeout and was killed).
"""

import gc
import importlib.util
import json
import os
import runpy
import signal
import sys
import tempfile
import time

import absl.app  # noqa: F401  (imported once, for every child)
import absl.flags  # noqa: F401
import flax  # noqa: F401
import jax  # noqa: F401  (the import, not a backend: no device is touched before the fork)
import ml_collections  # noqa: F401
import numpy  # noqa: F401
import optax  # noqa: F401
import orbax.checkpoint  # noqa: F401

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # as flamingo_jax.data._tf imports it
import tensorflow  # noqa: E402,F401  (its devices are hidden by the child's first tf(), as in a real run)

gc.collect()
gc.freeze()  # the libraries' objects: no collection in a child walks them (nor copies their pages)


def _child(module: str, args: list[str], out: str, err: str) -> None:
    """Runs in the forked child: `python -m module args` with its stdout and stderr in files."""
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(0, closefd=False)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    sys.argv = [module, *args]
    sys.path[0] = os.getcwd()  # as `python -m` puts the working directory first
    code = 0
    try:
        if importlib.util.find_spec(module) is None:  # as `python -m` says it: one line, exit 1
            print(f"{sys.executable}: No module named {module}", file=sys.stderr)
            code = 1
        else:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if isinstance(exit_.code, int) or exit_.code is None:
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - as an uncaught exception ends `python -m`: traceback, exit 1
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(module: str, args: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out, err = os.path.join(folder, "out"), os.path.join(folder, "err")
        for path in (out, err):
            open(path, "w").close()
        pid = os.fork()
        if pid == 0:
            _child(module, args, out, err)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = -9
                break
            time.sleep(0.01)
        returncode = status if status == -9 else os.waitstatus_to_exitcode(status)
        with open(out) as o, open(err) as e:
            return {"returncode": returncode, "stdout": o.read(), "stderr": e.read()}


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        reply = run(request["module"], request["args"], request.get("timeout", 120))
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
