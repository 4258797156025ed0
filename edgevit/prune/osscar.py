"""OSSCAR (Meng et al., arXiv 2403.12983): one-shot structured pruning of one layer by
combinatorial optimisation of its reconstruction error.

For a linear layer y = x·W (rows of W = input columns, grouped: one group per head or per
MLP unit), with calibration inputs X, minimise over the kept set S (|S| = k groups) and the
kept weights W_S::

    f(S) = ½‖X(Ŵ − W)‖² + ½λ‖Ŵ − W‖²   with W zero outside S
         = ½ (Ŵ − W)ᵀ H (Ŵ − W),         H = XᵀX + λ·mean(diag)·I,  G = H·Ŵ

whose minimiser for fixed S is the ridge least-squares re-fit W_S = H_SS⁻¹ G_S. Only the
d×d Gram matrix is needed. The set is chosen by greedy backward elimination (cost of
dropping g: ½ tr(W_gᵀ[(H_S⁻¹)_gg]⁻¹W_g)), then local search that swaps groups in and out,
each evaluated by its exact objective, with the inverse kept current by low-rank
(Schur/Woodbury) drop and add updates rather than re-solved. A final exact re-fit in
float64 removes any drift.

Here ``Hinv`` and ``W`` live in the full index space with zero rows/columns for pruned
inputs, so drop/add are pure matrix updates with no index bookkeeping. An always-kept
``fixed`` index set (the bias, as a column of ones) lets the re-fit move the bias too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class GramAccumulator:
    """Accumulates [X, 1]ᵀ[X, 1] in float64 over batches of layer inputs (never all of X)."""

    def __init__(self, dim: int) -> None:
        self.h = torch.zeros(dim + 1, dim + 1, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64)
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        self.h += xa.T @ xa
        self.n += x.shape[0]

    def gram(self, ridge: float, bias: bool = True) -> torch.Tensor:
        """H (with the ones column unless ``bias`` is False) + λ·mean(diag of the inputs' part)·I."""
        h = self.h / max(self.n, 1)
        if not bias:
            h = h[:-1, :-1]
        scale = h.diagonal()[: h.shape[0] - (1 if bias else 0)].mean()
        return h + ridge * scale * torch.eye(h.shape[0], dtype=h.dtype)


@dataclass
class OsscarResult:
    keep: list[int]  # kept group ids, sorted
    weight: torch.Tensor  # (d_in + fixed, d_out) re-fitted rows of kept columns then fixed, float64
    objective: float  # f(S) after the re-fit
    greedy_objective: float  # f after greedy elimination, before local search
    swaps: int  # accepted local-search swaps


def _block_solve(blocks: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched solve of (n, s, s) systems; single-column groups (MLP units) divide."""
    if blocks.shape[-1] == 1:
        return rhs / blocks
    return torch.linalg.solve(blocks, rhs)


class _State:
    def __init__(self, h: torch.Tensor, w_hat: torch.Tensor) -> None:
        self.h, self.w_hat = h, w_hat
        self.g = h @ w_hat
        self.hinv = torch.linalg.inv(h)
        self.w = w_hat.clone()  # the full re-fit of the full set is Ŵ itself
        self.const = 0.5 * float((w_hat * self.g).sum())

    def copy(self) -> _State:
        s = _State.__new__(_State)
        s.h, s.w_hat, s.g, s.const = self.h, self.w_hat, self.g, self.const
        s.hinv, s.w = self.hinv.clone(), self.w.clone()
        return s

    def objective(self) -> float:
        """f(S) = ½ŴᵀHŴ − ½ tr(G_Sᵀ W_S), valid because W is always the exact re-fit on S."""
        return self.const - 0.5 * float((self.g * self.w).sum())

    def drop_costs(self, groups: torch.Tensor) -> torch.Tensor:
        """½ tr(W_gᵀ[(H⁻¹)_gg]⁻¹W_g) for each row of ``groups`` (n, s) of column indices."""
        blocks = self.hinv[groups.unsqueeze(-1), groups.unsqueeze(-2)]  # n, s, s
        wg = self.w[groups]  # n, s, m
        return 0.5 * (wg * _block_solve(blocks, wg)).sum(dim=(1, 2))

    def add_gains(self, groups: torch.Tensor) -> torch.Tensor:
        """Objective decrease from adding each group (exact, given the current kept set)."""
        hk = self.h[:, groups.reshape(-1)]  # d, n*s
        u = (self.hinv @ hk).T.reshape(*groups.shape, -1)  # n, s, d
        h_aa = self.h[groups.unsqueeze(-1), groups.unsqueeze(-2)]
        c = h_aa - torch.einsum("nsd,ntd->nst", u, self.h[groups])  # Schur complements
        r = self.g[groups] - self.h[groups] @ self.w  # n, s, m
        return 0.5 * (r * _block_solve(c, r)).sum(dim=(1, 2))

    def drop(self, idx: torch.Tensor) -> None:
        """Remove input columns ``idx``: block downdate of H⁻¹ and the OBS weight update."""
        q = self.hinv[:, idx] @ torch.linalg.inv(self.hinv[idx][:, idx])
        self.w -= q @ self.w[idx]
        self.hinv -= q @ self.hinv[idx, :]
        self.w[idx] = 0
        self.hinv[idx, :] = 0
        self.hinv[:, idx] = 0

    def add(self, idx: torch.Tensor) -> None:
        """Bring columns ``idx`` back: block-inverse (Schur) update and the exact re-fit step."""
        u = self.hinv @ self.h[:, idx]  # zero outside the kept set
        c_inv = torch.linalg.inv(self.h[idx][:, idx] - self.h[idx, :] @ u)
        v = u.clone()
        v[idx] -= torch.eye(len(idx), dtype=v.dtype)
        r = self.g[idx] - self.h[idx, :] @ self.w
        self.w -= v @ c_inv @ r
        self.hinv += v @ c_inv @ v.T


def osscar_prune(
    h: torch.Tensor,
    w_hat: torch.Tensor,
    groups: torch.Tensor,
    keep: int,
    fixed: torch.Tensor | None = None,
    swap_budget: int = 30,
    max_swap: int | None = None,
) -> OsscarResult:
    """Choose ``keep`` of the ``groups`` (n, s) of input columns of a layer with Gram ``h``
    (ridge included) and weights ``w_hat`` (d_in, d_out); return them with the re-fit."""
    h, w_hat = h.double(), w_hat.double()
    n = groups.shape[0]
    if not 1 <= keep <= n:
        raise ValueError(f"keep must lie in [1, {n}], got {keep}")
    st = _State(h, w_hat)
    kept = list(range(n))
    # greedy backward elimination, a few of the cheapest at a time
    step = max(1, (n - keep) // 32)
    while len(kept) > keep:
        costs = st.drop_costs(groups[kept])
        k = min(step, len(kept) - keep)
        gone = {kept[i] for i in torch.argsort(costs)[:k].tolist()}
        st.drop(groups[sorted(gone)].reshape(-1))
        kept = [g for g in kept if g not in gone]
    greedy = st.objective()
    # local search: swap s kept for s pruned groups, accept only if the exact objective falls;
    # a rejected swap halves s, and at s = 1 the next-cheapest kept group is tried in turn
    swaps = 0
    kept_set = set(kept)
    pruned = [g for g in range(n) if g not in kept_set]
    s = min(max_swap or max(1, n // 16), len(kept), len(pruned))
    current = greedy
    budget = swap_budget if pruned else 0
    rank = 0  # at s = 1: which kept group (by drop cost) to try swapping out
    while s > 0 and budget > 0 and rank < len(kept):
        budget -= 1
        trial = st.copy()
        order = torch.argsort(trial.drop_costs(groups[kept])).tolist()
        out = [kept[i] for i in (order[:s] if s > 1 else order[rank:rank + 1])]
        trial.drop(groups[out].reshape(-1))
        gains = trial.add_gains(groups[pruned])
        inn = [pruned[i] for i in torch.argsort(gains, descending=True)[:s].tolist()]
        trial.add(groups[inn].reshape(-1))
        value = trial.objective()
        if value < current - 1e-9 * abs(current):
            st, current, swaps, rank = trial, value, swaps + 1, 0
            kept = sorted((set(kept) - set(out)) | set(inn))
            pruned = sorted((set(pruned) - set(inn)) | set(out))
        elif s > 1:
            s //= 2
        else:
            rank += 1
    # exact least-squares re-fit on the final set
    cols = groups[sorted(kept)].reshape(-1)
    if fixed is not None:
        cols = torch.cat([cols, fixed])
    w_s = torch.linalg.solve(h[cols][:, cols], st.g[cols])
    value = st.const - 0.5 * float((st.g[cols] * w_s).sum())
    return OsscarResult(sorted(kept), w_s, value, greedy, swaps)


def selection_objective(h: torch.Tensor, w_hat: torch.Tensor, cols: torch.Tensor, refit: bool) -> float:
    """f for keeping input columns ``cols``: with the least-squares re-fit, or with the
    original weights left as they are (plain selection)."""
    h, w_hat = h.double(), w_hat.double()
    w = torch.zeros_like(w_hat)
    if refit:
        w[cols] = torch.linalg.solve(h[cols][:, cols], (h @ w_hat)[cols])
    else:
        w[cols] = w_hat[cols]
    d = w_hat - w
    return 0.5 * float((d * (h @ d)).sum())
