"""The linear algebra the function mark is fitted and read with (numpy and scipy only, no model): the top
principal components of a model's features, the centred regressions of its answers, censored ones included,
and the class order a server may have shuffled. securemark.fingerprint.function builds the mark on these."""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import eigh
from scipy.linalg import lstsq as scipy_lstsq
from scipy.optimize import linear_sum_assignment


def principal(hc: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` largest eigenvalues (descending, 1 <= n <= min(Q, F)) of the covariance of centred rows ``hc``
    (Q x F) and their unit eigenvectors (F x n). With more features than rows it works on the Q x Q Gram
    matrix instead, whose eigenvectors map to the covariance's: the cost is that of the smaller side either
    way. There, an eigenvalue that is 0 (to rounding) has no eigenvector it could map to: its column is 0."""
    q, f = hc.shape
    if not 1 <= n <= min(q, f):
        raise ValueError(f"asked for {n} principal components of {q} rows of {f} features")
    top = {"driver": "evx"}  # the top n alone, by bisection: 0.06-0.09 s against 0.09-0.15 s (74 of 1,000)
    if f <= q:
        lam, vec = eigh(hc.T @ hc / max(q - 1, 1), subset_by_index=[f - n, f - 1], **top)
    else:
        lam, u = eigh(hc @ hc.T / max(q - 1, 1), subset_by_index=[q - n, q - 1], **top)
        seen = lam > 1e-12 * max(float(lam[-1]), 1e-300)
        vec = np.where(seen, hc.T @ u / np.sqrt(np.where(seen, lam, 1.0) * max(q - 1, 1)), 0.0)
    return np.maximum(lam[::-1], 0.0), vec[:, ::-1]


def distinct_rows(a: np.ndarray) -> int:
    """How many different rows ``a`` (N x D) holds: rows equal bit for bit count once, -0.0 read as 0.0 (so
    two equal rows holding NaN count once, where numpy's unique counts them apart). By hashing each row's
    bytes: numpy's unique(axis=0) sorts structured rows, 0.19 s against 2 ms on 1,000 MNIST images."""
    rows = np.asarray(a).reshape(len(a), -1)
    if np.issubdtype(rows.dtype, np.floating):
        rows = rows + 0.0  # turns -0.0 into 0.0; integers stay as they are (2^53 + 1 is not 2^53)
    return len({row.tobytes() for row in np.ascontiguousarray(rows)})


def helmert(classes: int) -> np.ndarray:
    """U (C x C-1): an orthonormal basis of the vectors whose entries sum to zero (fixed, no QR signs)."""
    u = np.zeros((classes, classes - 1))
    for k in range(1, classes):
        u[:k, k - 1] = 1.0
        u[k, k - 1] = -k
        u[:, k - 1] /= math.sqrt(k * (k + 1))
    return u


def centred(z: np.ndarray) -> np.ndarray:
    return z - z.mean(axis=1, keepdims=True)


def lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares by numpy's SVD solver (gelsd), and by the plain SVD one (gelss) on the rare matrix whose
    divide-and-conquer SVD does not converge."""
    try:
        return np.linalg.lstsq(x, y, rcond=None)[0]
    except np.linalg.LinAlgError:
        return scipy_lstsq(x, y, lapack_driver="gelss")[0]


def centred_on(y: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Each row's ``observed`` entries minus their own mean, 0 elsewhere (``centred`` when all are observed)."""
    yo = np.where(observed, y, 0.0)
    n = observed.sum(axis=1, keepdims=True)
    return np.where(observed, yo - yo.sum(axis=1, keepdims=True) / np.maximum(n, 1), 0.0)


# masked_fit drops every direction of its normal matrix seen with less than this share of the best-seen one's
# information (with whitened regressors, about one query's worth in 1,000). A confident model's censored answers
# show some classes beside others in a few queries only; at 1e-8 those directions were kept and the white-box
# mark's feature noise in them, amplified up to 10^8, swamped the reading: rounded, top-3 and top-k answers of one
# trained model in four were missed, which model depending on the machine's floating-point low bits. A sweep of
# the cut over 17 trained CNNs caught them all anywhere in 1e-4 .. 1e-2; `securemark bench censored` measures it.
UNSEEN = 1e-3


def masked_fit(x: np.ndarray, y: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Coefficients B (R x C, class-centred) of y_q = B^T x_q + c_q (a free constant per query) fitted on the
    ``observed`` entries of y (Q x C) only: the least-squares fit of each query's observed entries around
    their own mean. With every entry observed it is the plain regression of the centred rows of y on x; a
    query with fewer than two observed entries says nothing (a top-1-only answer carries no mark)."""
    q, r = x.shape
    c = y.shape[1]
    o = observed.astype(np.float64)
    inv = 1.0 / np.maximum(o.sum(axis=1, keepdims=True), 1.0)
    normal = np.zeros((r, c, r, c))
    for k in range(c):  # sum_q x_q x_q^T (x) diag(o_q)
        normal[:, k, :, k] = (x * o[:, k : k + 1]).T @ x
    z = (x[:, :, None] * (o * np.sqrt(inv))[:, None, :]).reshape(q, r * c)  # minus sum_q x_q x_q^T (x) o o^T / n
    normal = normal.reshape(r * c, r * c) - z.T @ z
    rhs = x.T @ centred_on(y, observed)  # sum_q x_q (x) Pi_q y_q
    # min norm, so class-centred; directions the mask leaves (nearly) unseen are dropped, not amplified. The
    # normal matrix is symmetric: its eigendecomposition is the pseudo-inverse's (LAPACK's SVD least squares,
    # gelsd, failed to converge on one such matrix of a trained quickstart CNN's rounded answers)
    lam, vec = np.linalg.eigh((normal + normal.T) / 2)
    seen = lam > UNSEEN * max(float(lam[-1]), 1e-300)
    beta = vec[:, seen] @ ((vec[:, seen].T @ rhs.reshape(-1)) / lam[seen])
    coef = beta.reshape(r, c)
    return coef - coef.mean(axis=1, keepdims=True)


def class_order(answers: np.ndarray, base_logits: np.ndarray) -> np.ndarray:
    """The column order of ``answers`` that matches the base's classes: the assignment that maximizes how
    often the suspect's top class is the base's (the identity for any copy; a pirate who serves the classes
    permuted is undone). Ties keep the identity."""
    c = base_logits.shape[1]
    agree = np.zeros((c, c))  # agree[i, j]: queries where the base says i and the suspect's column j is top
    np.add.at(agree, (base_logits.argmax(axis=1), answers.argmax(axis=1)), 1.0)
    rows, cols = linear_sum_assignment(agree + 1e-9 * np.eye(c), maximize=True)
    return cols[np.argsort(rows)]
