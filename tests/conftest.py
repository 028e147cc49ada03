import jax


# Float64 everywhere: the tests compare against NumPy/SciPy references and finite
# differences. Float32 tests cast explicitly.
jax.config.update("jax_enable_x64", True)
