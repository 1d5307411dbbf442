"""The XLA:CPU settings every test program compiles with (no imports: conftest sets them before
JAX starts, and subprocess tests hand them to their children).

Compiling dominates the suite on XLA:CPU. Unoptimised machine code (`--xla_backend_optimization_level=0`,
no expensive LLVM passes) about halves it; XLA's classic loop emitters instead of the MLIR fusion
emitters (`--xla_cpu_use_fusion_emitters=false`) cut the tiny train step's compile 2.6x more, at
the same run time; one LLVM module per program (`--xla_cpu_parallel_codegen_split_count=1`)
rather than parts compiled on parallel threads saves about 5% more (measured idle; where every
core already runs a test, the threads only add work). Every program of a session is compiled alike, so equalities within a
test hold.
"""

# As `jax.jit(..., compiler_options=...)` for programs that must say so themselves ...
FAST_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False, "xla_cpu_parallel_codegen_split_count": 1}
# ... and as XLA_FLAGS for the session and its subprocesses.
FAST = " ".join(f"--{name}={str(value).lower()}" for name, value in FAST_OPTIONS.items())


def with_devices(count: int) -> str:
    """XLA_FLAGS for a subprocess with `count` fake CPU devices, compiled as the suite compiles."""
    return f"--xla_force_host_platform_device_count={count} {FAST}"
