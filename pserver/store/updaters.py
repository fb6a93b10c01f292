"""Server update functions: the paper's user-defined functions run where the parameters live.

An Updater turns pushed rows into new parameter rows (and optimizer state), vectorised over rows.
Built-ins (sum, assign, sgd, adagrad, adam, ftrl, l1_prox) are found by name in a registry, so a
TableSpec names its rule in JSON. Plain numpy (workers import it to size their pushes); the compiled
twins used by Table live in ``pserver.store.index`` and are tested against these. Formulas:
docs/store.md, "Update rules"."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..errors import TableError

# Ids of the built-in rules compiled in index._update_row. A subclass that overrides apply()
# never uses them (see kernel_of).
KERNEL_SUM, KERNEL_ASSIGN, KERNEL_SGD, KERNEL_ADAGRAD, KERNEL_FTRL, KERNEL_L1_PROX, KERNEL_ADAM = \
    range(7)


class Updater:
    """Base class of server update functions; vectorised over rows.

    push_factor: pushed columns per value column (a worker pushes dim * push_factor columns).
    state_factor: optimizer-state columns per value column, zero-initialised on insert.
    integer_exact: the rule maps integer rows to integer rows exactly (allowed on int64 tables).
    """

    push_factor: int = 1
    state_factor: int = 0
    integer_exact: bool = False

    def apply(self, w: np.ndarray, state: np.ndarray | None, pushed: np.ndarray) -> None:
        """Update rows in place. w: (n, dim); state: (n, state_factor*dim) or None;
        pushed: (n, push_factor*dim). w and state may be views into the table."""
        raise NotImplementedError

    def kernel_params(self) -> tuple[int, np.ndarray] | None:
        """(kernel id, float64 parameters) of the compiled twin, or None for numpy only."""
        return None


def kernel_of(updater: Updater) -> tuple[int, np.ndarray] | None:
    """The compiled rule to use for ``updater``, or None when only its numpy apply() is valid
    (a user subclass may override apply(), so only the exact built-in classes qualify)."""
    if type(updater) not in _BUILTIN_CLASSES:
        return None
    return updater.kernel_params()


def _number(name: str, value: object, *, positive: bool = False) -> float:
    """Validate an updater argument: a finite JSON number, > 0 if positive else >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TableError(f"updater argument {name!r} must be a number, got {value!r}")
    try:
        v = float(value)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        rule = "> 0" if positive else ">= 0"
        raise TableError(f"updater argument {name!r} must be finite and {rule}, got {value!r}")
    return v


class SumUpdater(Updater):
    """w += g (aggregation; the default)."""

    integer_exact = True

    def apply(self, w, state, pushed):
        w += pushed

    def kernel_params(self):
        return KERNEL_SUM, np.zeros(0)


class AssignUpdater(Updater):
    """w = g (last writer wins)."""

    integer_exact = True

    def apply(self, w, state, pushed):
        w[...] = pushed

    def kernel_params(self):
        return KERNEL_ASSIGN, np.zeros(0)


class SGDUpdater(Updater):
    """w -= lr * g."""

    def __init__(self, lr: float) -> None:
        self.lr = _number("lr", lr, positive=True)

    def apply(self, w, state, pushed):
        w -= self.lr * pushed

    def kernel_params(self):
        return KERNEL_SGD, np.array([self.lr])


class AdagradUpdater(Updater):
    """n += g^2; w -= lr * g / sqrt(n + eps). State: n (dim columns)."""

    state_factor = 1

    def __init__(self, lr: float, eps: float = 1e-8) -> None:
        self.lr = _number("lr", lr, positive=True)
        self.eps = _number("eps", eps, positive=True)

    def apply(self, w, state, pushed):
        state += pushed * pushed
        w -= self.lr * pushed / np.sqrt(state + self.eps)

    def kernel_params(self):
        return KERNEL_ADAGRAD, np.array([self.lr, self.eps])


class AdamUpdater(Updater):
    """Row-wise lazy Adam: a row's moments and step count change only when it is pushed, and its
    bias correction uses its own step count t. State: m, v, then t (in the first of dim columns).
    t += 1; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    w -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)."""

    state_factor = 3

    def __init__(self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        self.lr = _number("lr", lr, positive=True)
        self.beta1 = _number("beta1", beta1)
        self.beta2 = _number("beta2", beta2)
        self.eps = _number("eps", eps, positive=True)
        if self.beta1 >= 1 or self.beta2 >= 1:
            raise TableError(f"adam needs beta1, beta2 < 1, got {beta1!r}, {beta2!r}")

    def apply(self, w, state, pushed):
        dim = w.shape[1]
        m, v, t = state[:, :dim], state[:, dim:2 * dim], state[:, 2 * dim:2 * dim + 1]
        t += 1
        m[...] = self.beta1 * m + (1 - self.beta1) * pushed
        v[...] = self.beta2 * v + (1 - self.beta2) * pushed * pushed
        mhat = m / (1 - self.beta1 ** t)
        vhat = v / (1 - self.beta2 ** t)
        w -= self.lr * mhat / (np.sqrt(vhat) + self.eps)

    def kernel_params(self):
        return KERNEL_ADAM, np.array([self.lr, self.beta1, self.beta2, self.eps])


class FTRLUpdater(Updater):
    """FTRL-proximal (McMahan et al., KDD 2013). State: z then n (2 * dim columns)."""

    state_factor = 2

    def __init__(self, alpha: float, beta: float = 1.0, l1: float = 0.0, l2: float = 0.0) -> None:
        self.alpha = _number("alpha", alpha, positive=True)
        self.beta = _number("beta", beta)
        self.l1 = _number("l1", l1)
        self.l2 = _number("l2", l2)

    def apply(self, w, state, pushed):
        dim = w.shape[1]
        z, n, g = state[:, :dim], state[:, dim:], pushed
        sigma = (np.sqrt(n + g * g) - np.sqrt(n)) / self.alpha
        z += g - sigma * w
        n += g * g
        denom = (self.beta + np.sqrt(n)) / self.alpha + self.l2
        # where |z| <= l1 the numerator is masked to 0, so denom is never 0 where it matters
        shrunk = np.where(np.abs(z) <= self.l1, 0.0, z - np.sign(z) * self.l1)
        w[...] = -shrunk / np.where(shrunk == 0, 1.0, denom)

    def kernel_params(self):
        return KERNEL_FTRL, np.array([self.alpha, self.beta, self.l1, self.l2])


class L1ProxUpdater(Updater):
    """Proximal step of Delayed Block Proximal Gradient. Pushed: [g, u] (2 * dim columns), the
    summed gradient and summed diagonal curvature bound."""

    push_factor = 2

    def __init__(self, l1: float, l2: float = 0.0, eta: float = 1.0) -> None:
        self.l1 = _number("l1", l1)
        self.l2 = _number("l2", l2)
        self.eta = _number("eta", eta, positive=True)

    def apply(self, w, state, pushed):
        dim = w.shape[1]
        g, u = pushed[:, :dim], pushed[:, dim:] / self.eta
        denom = u + self.l2
        x = u * w - g
        shrunk = np.sign(x) * np.maximum(np.abs(x) - self.l1, 0.0)
        ok = denom > 0
        w[...] = np.where(ok, shrunk / np.where(ok, denom, 1.0), w)

    def kernel_params(self):
        return KERNEL_L1_PROX, np.array([self.l1, self.l2, self.eta])


class FunctionUpdater(Updater):
    """Wraps a user callable ``fn(w, pushed) -> None`` that updates w (n, dim) in place.

    Used for ``pserver.KVServer(handle=...)``. The callable sees gathered copies of the rows (or
    views for dense runs), so it must write into w rather than rebind it.
    """

    def __init__(self, fn: Callable[[np.ndarray, np.ndarray], None], push_factor: int = 1) -> None:
        if not callable(fn):
            raise TableError(f"FunctionUpdater needs a callable fn(w, pushed), got {fn!r}")
        if isinstance(push_factor, bool) or not isinstance(push_factor, int) or push_factor < 1:
            raise TableError(f"push_factor must be an int >= 1, got {push_factor!r}")
        self.fn = fn
        self.push_factor = push_factor

    def apply(self, w, state, pushed):
        self.fn(w, pushed)


_BUILTIN_CLASSES = frozenset({SumUpdater, AssignUpdater, SGDUpdater, AdagradUpdater,
                              AdamUpdater, FTRLUpdater, L1ProxUpdater})

_REGISTRY: dict[str, Callable[..., Updater]] = {
    "sum": SumUpdater,
    "assign": AssignUpdater,
    "sgd": SGDUpdater,
    "adagrad": AdagradUpdater,
    "adam": AdamUpdater,
    "ftrl": FTRLUpdater,
    "l1_prox": L1ProxUpdater,
}


def register_updater(name: str, factory: Callable[..., Updater], replace: bool = False) -> None:
    """Make ``factory(**updater_args) -> Updater`` available as TableSpec(updater=name).

    Register in every process that builds or parses such a spec (workers and servers).
    Raises TableError for an empty name, a non-callable factory, or an existing name unless
    replace=True.
    """
    if not isinstance(name, str) or not name:
        raise TableError(f"updater name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TableError(f"updater factory for {name!r} must be callable, got {factory!r}")
    if name in _REGISTRY and not replace and _REGISTRY[name] is not factory:
        raise TableError(f"updater {name!r} is already registered; pass replace=True to override")
    _REGISTRY[name] = factory


def updater_names() -> list[str]:
    """Names of all registered updaters, sorted."""
    return sorted(_REGISTRY)


def make_updater(name: str, args: dict) -> Updater:
    """Build the registered updater ``name`` with keyword arguments ``args``.

    Raises TableError for an unknown name, unknown/missing arguments, or invalid values.
    """
    factory = _REGISTRY.get(name) if isinstance(name, str) else None
    if factory is None:
        raise TableError(f"unknown updater {name!r}; registered: {', '.join(updater_names())} "
                         "(add your own with pserver.register_updater)")
    try:
        updater = factory(**args)
    except TableError:
        raise
    except TypeError as e:
        raise TableError(f"bad arguments {args!r} for updater {name!r}: {e}") from None
    if not isinstance(updater, Updater):
        raise TableError(f"factory of updater {name!r} returned {type(updater).__name__}, "
                         "not an Updater")
    for attr in ("push_factor", "state_factor"):
        v = getattr(updater, attr)
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if attr == "push_factor" else 0):
            raise TableError(f"updater {name!r} has invalid {attr}={v!r}")
    return updater
