"""GPU check: float32 accuracy of every loss and its gradient, and the step-cost ratios
at scale, in one table each (under 10 minutes on one GPU).

    python benchmarks/gpu_check.py           # on a GPU: N = 65,536, m = 512
    python benchmarks/gpu_check.py --tiny    # N = 256, m = 8 (the default on a CPU)

**Accuracy.** On recent NVIDIA GPUs a float32 matmul at JAX's default precision runs in
TF32 (about 10 mantissa bits), which ruins a Gram matrix, a Hessian or a Jacobian, so the
library asks for full precision in every matmul of its own (`tests/test_precision.py`
checks the jaxprs). This script checks the numbers: the float32 features of an MLP
(computed once, at the default precision) go into each loss in float32 and in float64,
and the relative errors of the loss and of its gradient in the features are printed
twice: at JAX's default matmul precision (TF32 left on, as users run) and with every
matmul forced to full precision (`jax.default_matmul_precision("highest")`), the
same-precision reference. A row passes when the default-precision error is within twice
the reference error plus the float32 rounding of the value, `32 eps (1 + |value|)`: a
TF32 matmul left in the library shows up as errors ~1e-3 times the condition number
above the reference. On a CPU, where there is no TF32, the reference is not rerun (its
columns show "-"). The
readout losses' errors are also held to the inner solve's documented tolerance
(`sqrt(eps) |J|`, see `vploss.InnerStats`).

**Step cost.** Every `benchmarks/suite.py` cell (each loss's VarPro step against a plain
trainable head, with the flop-model limit) at N = 65,536 and m = 512.
"""

import os


os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before JAX loads, as in suite.py

import argparse  # noqa: E402
import time  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import suite  # noqa: E402
from _common import feature_mlp  # noqa: E402


jax.config.update("jax_enable_x64", True)  # float64 references; float32 stays float32

import vploss  # noqa: E402


FULL = {"n": 65536, "m": 512, "repeats": 5, "warmup_steps": 100}
TINY = {"n": 256, "m": 8, "repeats": 2, "warmup_steps": 5}
EPS32 = float(np.finfo(np.float32).eps)
NUM_CLASSES = 10


class ConvexSoftplus(eqx.Module):
    """`u_i(x) = softplus(<a_i, x>)`, convex in `x`, written without a matmul (as sums
    of products) so that the flow's check measures the library's precision alone."""

    weight: jax.Array

    def __call__(self, sample):
        return jax.nn.softplus(jnp.sum(self.weight * sample, axis=1))


def _identity(sample):
    return sample


def _feature_losses(n, m):
    """`name -> (loss(features) -> (value, readout), readout loss?)` on the features of
    an `n`-sample batch, every loss of the library with its default solver."""
    points = jax.random.uniform(jax.random.PRNGKey(3), (n, 2), jnp.float32, -2.0, 2.0)
    regression = suite.LOSSES["msereg"].labels(points)
    binary = suite.LOSSES["bce"].labels(points)
    classes = suite.LOSSES["ce"].labels(points)
    counts = jnp.floor(3 * jnp.exp(-jnp.sum(points**2, axis=1))).astype(jnp.float32)
    wide = max(2, m // 4)  # fewer samples than features: the dual ridge form

    def ridge(features, **kwargs):
        return vploss.vploss_msereg(_identity, features, regression, **kwargs)

    def residual(features):
        res, readout = vploss.vpresidual_msereg(_identity, features, regression, alpha2=1e-3)
        return 0.5 * jnp.sum(res**2), readout

    def dual(features):
        design = features[:wide]
        return vploss.vploss_msereg(_identity, design, regression[:wide], alpha2=1e-3)

    def bce(features):
        return vploss.vploss_bce(_identity, features, binary, alpha2=1e-3)

    def ce(features):
        return vploss.vploss_ce(_identity, features, classes, alpha2=1e-3, num_classes=NUM_CLASSES)

    def poisson(features):
        return vploss.vploss_poisson(_identity, features, counts, alpha2=1e-3)

    return {
        "vploss_msereg (Cholesky)": (lambda f: ridge(f, alpha2=1e-3), False),
        "vploss_msereg (GCV)": (lambda f: ridge(f, alpha2="gcv"), False),
        "vploss_msereg (SVD, alpha2 = 0)": (lambda f: ridge(f, alpha2=0.0, solver="svd"), False),
        "vploss_msereg (dual, N < m)": (dual, False),
        "vpresidual_msereg": (residual, False),
        "vploss_bce": (bce, True),
        "vploss_ce": (ce, True),
        "vploss_poisson": (poisson, True),
    }


def _relative_errors(loss, features32):
    """Relative errors of the float32 loss and its gradient in the features against
    float64 on the same (float32) features."""

    def value_and_grad(features):
        value, grad = jax.jit(jax.value_and_grad(lambda f: loss(f)[0]))(features)
        return float(value), np.asarray(grad, np.float64)

    value32, grad32 = value_and_grad(features32)
    value64, grad64 = value_and_grad(features32.astype(jnp.float64))
    loss_error = abs(value32 - value64) / max(abs(value64), np.finfo(np.float64).tiny)
    grad_error = np.linalg.norm(grad32 - grad64) / max(np.linalg.norm(grad64), 1e-300)
    return loss_error, grad_error, abs(value64)


def _flow_errors(n):
    """The same for `vploss_cpflow`, in the feature map's weights (the flow needs the
    feature map's derivatives in `x`, so it cannot take precomputed features)."""
    points = jax.random.normal(jax.random.PRNGKey(4), (n, 2), jnp.float32)
    model = ConvexSoftplus(jax.random.normal(jax.random.PRNGKey(5), (4, 2), jnp.float32))

    def value_and_grad(dtype):
        cast = jax.tree.map(lambda a: a.astype(dtype), (model, points))
        step = eqx.filter_jit(
            eqx.filter_value_and_grad(lambda mdl, x: vploss.vploss_cpflow(mdl, x, alpha2=1e-3)[0])
        )
        value, grad = step(*cast)
        return float(value), np.asarray(grad.weight, np.float64)

    value32, grad32 = value_and_grad(jnp.float32)
    value64, grad64 = value_and_grad(jnp.float64)
    loss_error = abs(value32 - value64) / abs(value64)
    return loss_error, np.linalg.norm(grad32 - grad64) / np.linalg.norm(grad64), abs(value64)


def accuracy(n, m):
    """Prints the accuracy table; returns whether every row passed."""
    print(f"\n### float32 against float64 (N = {n}, m = {m}; relative errors)\n")
    print(
        "| loss | loss, default precision | loss, highest | gradient, default "
        "| gradient, highest | passes |"
    )
    print("|---|---|---|---|---|---|")
    model = feature_mlp(m, key=jax.random.PRNGKey(0))
    points = jax.random.uniform(jax.random.PRNGKey(3), (n, 2), jnp.float32, -2.0, 2.0)
    features = jax.vmap(model)(points)
    rows = {
        name: (lambda fn=fn: _relative_errors(fn, features), readout_loss)
        for name, (fn, readout_loss) in _feature_losses(n, m).items()
    }
    rows["vploss_cpflow"] = (lambda: _flow_errors(n), False)
    all_pass = True
    for name, (errors, readout_loss) in rows.items():
        loss_default, grad_default, value = errors()
        reference = jax.devices()[0].platform != "cpu"  # a CPU has no TF32
        loss_high, grad_high = loss_default, grad_default
        if reference:
            with jax.default_matmul_precision("highest"):
                loss_high, grad_high, _ = errors()
        rounding = 32 * EPS32 * (1 + 1 / max(value, 1e-30))  # relative to |value|
        passes = (
            loss_default <= 2 * loss_high + rounding and grad_default <= 2 * grad_high + 32 * EPS32
        )
        if readout_loss:  # the inner solve's documented loss tolerance
            passes &= loss_default <= EPS32**0.5 + 2 * rounding
        all_pass &= passes
        high = (f"{loss_high:.1e}", f"{grad_high:.1e}") if reference else ("-", "-")
        print(
            f"| `{name}` | {loss_default:.1e} | {high[0]} | {grad_default:.1e} | {high[1]} | "
            f"{'yes' if passes else '**no**'} |",
            flush=True,
        )
    return all_pass


def step_costs(n, m, repeats, warmup_steps):
    print(f"\n### Step cost against a plain trainable head (float32, N = {n}, m = {m})\n")
    print("| loss " + suite.TABLE_HEADER)
    print("|---" + "|---" * (suite.TABLE_HEADER.count("|") - 1) + "|")
    for name, loss in suite.LOSSES.items():
        result = suite.cell(name, n, m, repeats, warmup_steps)
        print(f"| `{loss.name}` " + suite.table_row(n, m, result), flush=True)


def main():
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--tiny", action="store_true", help="N = 256, m = 8 (CPU default)")
    args = parser.parse_args()
    device = jax.devices()[0]
    sizes = TINY if args.tiny or device.platform == "cpu" else FULL
    print(
        f"jax {jax.__version__}, {device.platform} ({device.device_kind}), "
        f"default matmul precision: {jax.config.jax_default_matmul_precision}"
    )
    start = time.perf_counter()
    passed = accuracy(sizes["n"], sizes["m"])
    step_costs(sizes["n"], sizes["m"], sizes["repeats"], sizes["warmup_steps"])
    print(f"\n{time.perf_counter() - start:.0f} s; accuracy {'passed' if passed else 'FAILED'}")
    raise SystemExit(0 if passed else 1)


if __name__ == "__main__":
    main()
