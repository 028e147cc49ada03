import os


# LAPACK calls on tall matrices are very slow with multi-threaded OpenBLAS on a busy
# 2-core machine; the tests time nothing, so use one thread. (Before JAX loads.)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402


# Float64 everywhere: the tests compare against NumPy/SciPy references and finite
# differences. Float32 tests cast explicitly.
jax.config.update("jax_enable_x64", True)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. A pytest-xdist worker runs
    many modules in one process, which otherwise keeps every program compiled so far;
    a worker of the slow stage once crashed (a segmentation fault in XLA's CPU
    compiler) late in such a run, and the test alone passed."""
    yield
    jax.clear_caches()
