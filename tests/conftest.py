import os


# LAPACK calls on tall matrices are very slow with multi-threaded OpenBLAS on a busy
# 2-core machine; the tests time nothing, so use one thread. (Before JAX loads.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402


# Float64 everywhere: the tests compare against NumPy/SciPy references and finite
# differences. Float32 tests cast explicitly.
jax.config.update("jax_enable_x64", True)
