"""Function-space fingerprint: customer j's code row as a small, keyed change of its copy's outputs, read
back through queries alone (a prediction API, a TorchScript file, a distilled student).

**The mark.** Let h(x) be the base model's penultimate features (the input of its last linear layer) and
z(x) = W h(x) + b its logits. On the owner's held-out data, h has mean mu and principal directions v_k with
variances lam_k. The mark lives in the whitened coordinates phi_k(x) = v_k . (h(x) - mu) / sqrt(lam_k) of the
components k = skip .. skip + K - 1, and in the C - 1 logit directions that change probabilities (a shift
common to all classes changes nothing: U is an orthonormal basis of the vectors whose entries sum to 0):

    m_j(x) = U A_j phi(x),   A_j = g_j * reshape(D e_j),   e_j = x_j - p   (the centred Tardos row)

D is a secret P x L matrix (P = (C - 1) K) with orthonormal rows or columns, derived from the owner secret;
g_j scales every copy's mark to the same energy: E_x ||m_j(x)||^2 = (budget * RMS of the centred logits)^2.
It is a closed-form edit of the last layer: W += U A_j V_K^T, b -= U A_j V_K^T mu (milliseconds per copy).

**Reading.** The owner queries the suspect on natural inputs, centres its log-probabilities (or logits) per
input, subtracts the base's centred logits and regresses the residual on the base's own features (the marked
components, the skipped ones as nuisance regressors, a constant): the coefficients are the suspect's A, and
y = D^T vec(A) / s (s: the nominal g) is the soft code. An intact copy returns D^T D e_j exactly (e_j itself
when L <= P), whatever the number of queries above the number of regressors. The observation is a function of
the suspect's answers and the owner's data only, never of an innocent's code row, so the same certified
Tardos bound (tracing.bound) holds for every answer a suspect can give.

**Why a student inherits it.** Distillation fits the student's outputs to the teacher's on natural inputs.
The mark is a linear function of the teacher's own features, of the same kind as the teacher's logits, so it
is as learnable as the task itself: a student that matches its teacher matches the mark. The skipped top
components are the class structure itself; every student relearns it with its own large errors (measured on
the MNIST-5k CNN: students' coefficient errors 0.6-2.7 on the top 9 whitened components against 0.1-0.3 on
the rest), so the mark is placed where students agree with their teacher. How much of it a student keeps
depends on how much the soft labels say: at temperature 4 a student keeps about half of the mark, at
temperature 1 (confident MNIST outputs are nearly one-hot) about a seventh. See docs/experiments/blackbox.md.

**Capacity.** P = (C - 1) K independent directions: the quickstart CNN's 64 features have 45-50 components
with variance (above 1e-4 of the top one), so with 10 classes P = 9 x 35..40 = 315..360 once the top 10 are
skipped. A code longer than P is carried through D with
orthonormal rows: the soft code is then the projection of e_j on a P-dimensional subspace, and the tracer
scores it exactly like a length-P code (the bound is unchanged; catching power is that of P positions).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.special import ndtri
from torch import nn

from securemark.errors import SecureMarkError
from securemark.fingerprint.fitting import (
    centred,
    centred_on,
    class_order,
    distinct_rows,
    helmert,
    lstsq,
    masked_fit,
    principal,
)
from securemark.fingerprint.keys import OwnerSecret
from securemark.prg import uniforms

StateDict = dict[str, torch.Tensor]
VARIANCE_FLOOR = 1e-4  # components with less variance than this share of the top one are not used


class FunctionMarkError(SecureMarkError, ValueError):
    """A model, a basis or a suspect's answers the function mark cannot work with."""


class FunctionMarkUnfit(FunctionMarkError):
    """The base model cannot carry a function mark a tracer could read (no linear head, NaN features, too few
    held-out inputs or components): its copies can carry the white-box mark alone. Unlike other
    FunctionMarkErrors (a spec that names another model, a bad budget), this is no mistake of the caller's."""


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's last nn.Linear (by registration order): the layer the mark edits and whose input is h."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise FunctionMarkUnfit(f"{type(model).__name__} has no nn.Linear layer: the function mark edits one")
    return found[-1]


@torch.no_grad()
def features_and_logits(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(h(x), z(x)) in float64: the input of the last linear layer and the model's outputs."""
    _, layer = last_linear(model)
    x = x.to(layer.weight.dtype)  # inputs of another float type (float64 held-out data) run as the model does
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))
    model.eval()
    try:
        outs = [model(x[i : i + batch]) for i in range(0, len(x), batch)]
    finally:
        hook.remove()
    h = torch.cat([s.reshape(len(s), -1) for s in seen]).double().cpu().numpy()
    return h, torch.cat(outs).double().cpu().numpy()


@dataclass(frozen=True)
class Basis:
    """What the owner keeps of the base for the function mark: the feature mean, the whitened principal
    directions (the ``skip`` nuisance ones first, then the K marked ones) and the centred logits' RMS."""

    mean: np.ndarray = field(repr=False)  # (F,)
    directions: np.ndarray = field(repr=False)  # (F, skip + K), whitened: columns v_k / sqrt(lam_k)
    skip: int
    logit_rms: float
    classes: int

    @property
    def components(self) -> int:
        return self.directions.shape[1] - self.skip

    @property
    def capacity(self) -> int:
        """P = (C - 1) K: the independent directions the mark can use."""
        return (self.classes - 1) * self.components

    @classmethod
    def fit(cls, model: nn.Module, x: torch.Tensor, skip: int = 10, components: int = 64) -> Basis:
        """The basis of ``model`` from the owner's natural inputs ``x`` (held-out data).

        The inputs bound the number of marked components K, not the width of the features: a reading fits
        skip + K + 1 regressors and needs twice that many queries, and the held-out set is what a tracer queries
        first, so K <= (distinct inputs) // 2 - skip - 1. A penultimate layer wider than the held-out set
        (ResNet-18: 512, an MLP: thousands) is marked in the top components the inputs estimate."""
        if len(x) == 0:
            raise FunctionMarkUnfit("no held-out inputs to fit a function mark on")
        h, z = features_and_logits(model, x)
        if not (np.all(np.isfinite(h)) and np.all(np.isfinite(z))):
            raise FunctionMarkUnfit("the base model's features or outputs hold NaN or inf on the held-out data")
        distinct = distinct_rows(x.reshape(len(x), -1).cpu().numpy())  # a repeated input adds nothing
        room = distinct // 2 - skip - 1
        if room < 1:
            raise FunctionMarkUnfit(f"{distinct} distinct held-out inputs are too few to fit a mark after skipping "
                                    f"{skip} components (need at least {2 * (skip + 2)})")  # fmt: skip
        mean = h.mean(axis=0)
        lam, vec = principal(h - mean, min(skip + min(components, room), h.shape[1]))
        usable = int(np.sum(lam > VARIANCE_FLOOR * max(lam[0], 1e-300)))
        k = min(components, room, usable - skip)
        if k < 1:
            raise FunctionMarkUnfit(
                f"the base's features have {usable} components with variance, none left after skipping {skip}"
            )
        directions = vec[:, : skip + k] / np.sqrt(lam[: skip + k])
        logit_rms = float(np.sqrt(np.mean(np.sum(centred(z) ** 2, axis=1))))
        return cls(mean, directions, skip, logit_rms, z.shape[1])

    def regressors(self, h: np.ndarray) -> np.ndarray:
        """(Q, skip + K + 1): whitened marked components first, then the skipped ones, then a constant."""
        phi = (h - self.mean) @ self.directions
        return np.hstack([phi[:, self.skip :], phi[:, : self.skip], np.ones((len(h), 1))])

    def to_array(self) -> np.ndarray:
        return np.concatenate([self.mean[:, None], self.directions], axis=1)

    @classmethod
    def from_array(cls, arr: np.ndarray, skip: int, logit_rms: float, classes: int) -> Basis:
        """A basis read back (from the registry), refused when damaged: wrong types or ranges, non-finite
        values, a direction that is all zero."""
        arr = np.asarray(arr, dtype=np.float64)
        ok = type(skip) is int and type(classes) is int and isinstance(logit_rms, float | int)
        ok = ok and skip >= 0 and 2 <= classes <= 100_000 and 0 < logit_rms < math.inf
        ok = ok and arr.ndim == 2 and arr.shape[1] >= skip + 2 and bool(np.all(np.isfinite(arr)))
        if not ok or not np.all(np.any(arr[:, 1:] != 0, axis=0)):
            raise FunctionMarkError(f"a stored function-mark basis (shape {arr.shape}, skip {skip!r}) is damaged")
        return cls(arr[:, 0].copy(), arr[:, 1:].copy(), skip, float(logit_rms), classes)


READABLE = 1.5  # an intact copy must read at this multiple of the threshold's floor, or the mark is refused


def check_readable(basis: Basis, length: int, eps: float, customers: int) -> None:
    """Refused (FunctionMarkUnfit) when even an intact copy could not be accused. An intact copy reads the
    projection of its centred row on the mark's min(P, L) directions, so its normalized score is about
    sqrt(min(P, L)) (measured on a 2,000-unit MLP: P = 9, 18, 135, 405 read at 3.0, 4.3, 11.6, 18.4); the
    certified threshold for n customers is at least the Gaussian z = Phi^-1(1 - eps / n). A mark whose
    intact copies read below READABLE x z (n taken as at least 1,000) is one whose copies would be traced to
    nobody after the least laundering: refused with what would make it readable."""
    z = float(-ndtri(eps / max(customers, 1000)))
    need = (READABLE * z) ** 2  # directions
    if min(basis.capacity, length) >= need:
        return
    if length < need:
        cure = f"a code of at least {math.ceil(need)} positions"
    else:
        k = math.ceil(need / (basis.classes - 1))
        cure = f"at least {2 * (basis.skip + k + 1)} held-out inputs (for {k} components)"
    raise FunctionMarkUnfit(
        f"the mark would have {min(basis.capacity, length)} directions: an intact leaked copy would score about "
        f"{math.sqrt(min(basis.capacity, length)):.1f} against a threshold of at least {z:.1f}; it needs {cure}"
    )


@functools.lru_cache(maxsize=4)
def code_matrix(secret: OwnerSecret, capacity: int, length: int) -> np.ndarray:
    """D (P x L) from the owner secret: orthonormal columns when L <= P, orthonormal rows otherwise. Kept for
    the few (secret, P, L) last asked (read-only): a federation fits a mark to every round's model, each of
    the same P, and recording one reads it back, so D was derived twice a round (0.16 s of a 1.1 s round of
    `bench rounds`)."""
    d = _code_matrix(secret, capacity, length)
    d.flags.writeable = False
    return d


def _code_matrix(secret: OwnerSecret, capacity: int, length: int) -> np.ndarray:
    u = uniforms(secret.derive(f"function-code/P={capacity}/L={length}"), 2 * capacity * length)
    u1, u2 = np.clip(u[::2], 1e-300, 1.0), u[1::2]  # Box-Muller: Gaussians from keyed uniforms
    g = (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)).reshape(capacity, length)
    if length <= capacity:
        q, r = np.linalg.qr(g)
        return q * np.sign(np.diag(r))  # unique: the signs of R fixed positive
    q, r = np.linalg.qr(g.T)
    return (q * np.sign(np.diag(r))).T


@dataclass(frozen=True)
class FunctionMark:
    """Embeds and reads code rows in the outputs of copies of one base under one owner secret."""

    basis: Basis
    code: np.ndarray = field(repr=False)  # D (P x L)
    bias: np.ndarray = field(repr=False)  # (L,) the Tardos bias p (0.5 for random codes)
    budget: float  # RMS of the mark / RMS of the centred logits, over the owner's data

    @classmethod
    def create(cls, secret: OwnerSecret, basis: Basis, bias: np.ndarray, budget: float) -> FunctionMark:
        if not 0 < budget < math.inf:
            raise FunctionMarkError(f"function-mark budget must be finite and > 0, got {budget}")
        return cls(basis, code_matrix(secret, basis.capacity, len(bias)), np.asarray(bias, np.float64), budget)

    @property
    def length(self) -> int:
        return self.code.shape[1]

    @property
    def strength(self) -> float:
        """The nominal gain s: E ||D e||^2 over the code's law is sum_l ||D_l||^2 p_l (1 - p_l)."""
        energy = float(np.sum(np.sum(self.code**2, axis=0) * self.bias * (1 - self.bias)))
        return self.budget * self.basis.logit_rms / math.sqrt(energy)

    def edit(self, bits: np.ndarray) -> np.ndarray:
        """The logit-space edit M_j = U A_j V_K^T (C x F) for code row ``bits`` (L,) of {0, 1}."""
        bits = np.asarray(bits)
        if bits.shape != (self.length,):
            raise FunctionMarkError(f"code row has shape {bits.shape}, expected ({self.length},)")
        a = self.code @ (bits.astype(np.float64) - self.bias)
        norm = float(np.linalg.norm(a))
        if norm == 0:  # cannot happen for a Tardos row (p in (0, 1)); kept as an explicit refusal
            raise FunctionMarkError("this code row has no component the function mark can carry")
        a *= self.budget * self.basis.logit_rms / norm
        b = self.basis
        marked = b.directions[:, b.skip :]
        return helmert(b.classes) @ a.reshape(b.classes - 1, b.components) @ marked.T

    def embed(self, sd: dict[str, torch.Tensor], layer: str, bits: np.ndarray) -> dict[str, torch.Tensor]:
        """``sd`` with its last linear layer ``layer`` (e.g. "head.3") carrying the mark of ``bits``."""
        w, bvec = sd.get(layer + ".weight"), sd.get(layer + ".bias")
        edit = self.edit(bits)
        if w is None or bvec is None or tuple(w.shape) != edit.shape:
            raise FunctionMarkError(f"the model has no linear layer {layer!r} of shape {edit.shape} with a bias")
        out = dict(sd)
        out[layer + ".weight"] = (w.double() + torch.from_numpy(edit)).to(w.dtype)
        out[layer + ".bias"] = (bvec.double() - torch.from_numpy(edit @ self.basis.mean)).to(bvec.dtype)
        return out

    def read(
        self, answers: np.ndarray, base_logits: np.ndarray, base_features: np.ndarray, floor: float | None = None
    ) -> Reading:
        """The soft code from a suspect's ``answers`` (Q x C log-probabilities or logits) to queries on which
        the base gave ``base_logits`` (Q x C) from ``base_features`` (Q x F).

        Three gauges a server may apply to its outputs are undone first, from the answers and the base alone
        (so an innocent's row stays independent of the reading): a class order (the answers' columns matched
        to the base's classes by the assignment that maximizes top-1 agreement); censoring, when ``floor`` (a
        log-probability) is given (rounding, float16, clamps, a top-k answer renormalized or not, k even
        varying by row), by reading each query's entries above the floor alone, around their own mean, the
        base's same entries with them (masked_fit); and a scale (a
        temperature, log base 10, logits multiplied up), by dividing the answers' coefficients by tau, their
        least-squares factor against the base's own coefficients on the skipped components, where no mark is
        written. An intact copy has the identity order and tau = 1 exactly (tau is kept within [1e-6, 1e6];
        1 when nothing is skipped)."""
        q, c = base_logits.shape
        answers = np.asarray(answers, dtype=np.float64)
        if answers.shape != (q, c):
            raise FunctionMarkError(f"the suspect answered with shape {answers.shape}, expected ({q}, {c})")
        if not np.all(np.isfinite(answers)):
            raise FunctionMarkError("the suspect's answers hold NaN or inf: no verdict")
        x = self.basis.regressors(base_features)
        if q < self.min_queries:
            raise FunctionMarkError(f"{q} queries are too few: the reading fits {x.shape[1]} regressors (need 2x)")
        if np.linalg.matrix_rank(x) < x.shape[1]:  # e.g. every query the same image: nothing can be read
            raise FunctionMarkError("the queries do not vary the base's features enough to read the mark; "
                                    "query natural, varied inputs")  # fmt: skip
        answers = answers[:, class_order(answers, base_logits)]
        if floor is not None:  # censored answers: the entries above the floor alone, the base's with them
            observed = answers > floor
            a, z = centred_on(answers, observed), centred_on(base_logits, observed)
            ca, cz = masked_fit(x, a, observed), masked_fit(x, z, observed)
        else:
            a, z = centred(answers), centred(base_logits)
            coef = lstsq(x, np.hstack([a, z]))  # (regressors, 2C)
            ca, cz = coef[:, :c], coef[:, c:]
        k, skip = self.basis.components, self.basis.skip
        nuisance = float(np.sum(cz[k : k + skip] ** 2))
        tau = float(np.clip(np.sum(ca[k : k + skip] * cz[k : k + skip]) / nuisance, 1e-6, 1e6)) if nuisance else 1.0
        mark = helmert(c).T @ (ca[:k] / tau - cz[:k]).T  # (C - 1, K)
        y = self.code.T @ mark.reshape(-1) / self.strength
        residual = a / tau - z
        fitted = x @ (ca / tau - cz)
        misfit = float(np.sum(residual**2) / max(float(np.sum(z**2)), 1e-300))
        return Reading(y, q, float(np.sqrt(np.mean(np.sum(residual**2, axis=1)))),
                       float(np.sqrt(np.mean(np.sum(fitted**2, axis=1)))), tau, misfit)  # fmt: skip

    def expected(self, bits: np.ndarray) -> np.ndarray:
        """What an intact copy of code row ``bits`` reads as, up to its per-copy gain: D^T D (x - p)."""
        return self.code.T @ (self.code @ (np.asarray(bits, dtype=np.float64) - self.bias))

    def health(
        self, base_view: tuple[np.ndarray, np.ndarray], copy: nn.Module, bits: np.ndarray, x: torch.Tensor
    ) -> float:
        """Cosine between ``copy``'s reading on inputs ``x`` and its row's expected reading, given the base's
        ``features_and_logits`` on the same x: 1 for a copy carrying only this mark, a little less beside the
        white-box mark (which perturbs the features)."""
        h, z = base_view
        _, answers = features_and_logits(copy, x)
        y, e = self.read(answers, z, h).y, self.expected(bits)
        return float(y @ e / max(float(np.linalg.norm(y) * np.linalg.norm(e)), 1e-300))

    @property
    def min_queries(self) -> int:
        """Queries a reading needs: twice the regressors (marked and skipped components and a constant)."""
        return 2 * (self.basis.directions.shape[1] + 1)


@dataclass(frozen=True)
class Reading:
    y: np.ndarray = field(repr=False)  # (L,) soft code: D^T D e for an intact copy
    queries: int
    residual_rms: float  # how far the suspect's centred outputs are from the base's (logits, per input)
    explained_rms: float  # the part of that linear in the base's features
    scale: float  # tau: the suspect's outputs over the base's (1 for a copy served as it is)
    misfit: float  # the residual's energy over the base's, on the entries read: how well this reading fits
