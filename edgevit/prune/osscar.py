"""OSSCAR (Meng et al., arXiv 2403.12983): one-shot structured pruning of one layer by
combinatorial optimisation of its reconstruction error.

For a linear layer y = x·W (rows of W = input columns, grouped: one group per head or per
MLP unit), with calibration inputs X, minimise over the kept set S (|S| = k groups) and the
kept weights W_S::

    f(S) = ½‖X(Ŵ − W)‖² + ½λ‖D^½(Ŵ − W)‖²   with W zero outside S, D = diag(XᵀX)
         = ½ (Ŵ − W)ᵀ H (Ŵ − W),                H = XᵀX + λ·D,  G = H·Ŵ

whose minimiser for fixed S is the ridge least-squares re-fit W_S = H_SS⁻¹ G_S. Only the
d×d Gram matrix is needed. The set is chosen by greedy backward elimination (cost of
dropping g: ½ tr(W_gᵀ[(H_S⁻¹)_gg]⁻¹W_g)), then local search that swaps groups in and out,
each evaluated by its exact objective, with the inverse kept current by low-rank
(Schur/Woodbury) drop and add updates rather than re-solved. A final exact re-fit in
float64 removes any drift.

The ridge is per column (λ·diag(XᵀX), not λ·mean(diag)·I): scaling one input column by c and
its weight row by 1/c is the same function, and with a per-column ridge it is also the same
problem, so the choice does not depend on activation scale (ViT fc2 inputs have outlier
channels). Everything runs in float64 on the device the Gram matrix lives on.

Here ``Hinv`` and ``W`` live in the full index space with zero rows/columns for pruned
inputs, so drop/add are pure matrix updates with no index bookkeeping. An always-kept
``fixed`` index set (the bias, as a column of ones) lets the re-fit move the bias too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class GramAccumulator:
    """Accumulates [X, 1]ᵀ[X, 1] in float64 over batches of layer inputs (never all of X), on
    ``device`` (the run's: a GPU does the d×d products when there is one)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.h = torch.zeros(dim + 1, dim + 1, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.h.device, torch.float64)
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        self.h += xa.T @ xa
        self.n += x.shape[0]

    def gram(self, ridge: float, bias: bool = True) -> torch.Tensor:
        """H (with the ones column unless ``bias`` is False) + λ·diag(H): each column's ridge is
        its own second moment, so rescaling a column rescales its ridge with it. A column that
        is (nearly) constant zero gets the floor 1e-12·mean(diag) so H stays invertible."""
        h = self.h / max(self.n, 1)
        if not bias:
            h = h[:-1, :-1]
        d = h.diagonal()
        floor = 1e-12 * d.mean().clamp_min(torch.finfo(h.dtype).tiny)
        return h + ridge * torch.diag(d.clamp_min(floor))


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
        v[idx] -= torch.eye(len(idx), dtype=v.dtype, device=v.device)
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
    greedy_step: int = 10,
    swap_size: int = 10,
) -> OsscarResult:
    """Choose ``keep`` of the ``groups`` (n, s) of input columns of a layer with Gram ``h``
    (ridge included) and weights ``w_hat`` (d_in, d_out); return them with the re-fit.

    Greedy elimination drops the ``greedy_step`` cheapest groups at a time; local search
    starts by swapping ``swap_size`` groups (the official code: 10 units or 2 heads per greedy
    step, 10 units or 5 heads per swap). Runs in float64 on ``h``'s device."""
    if greedy_step < 1 or swap_size < 1:
        raise ValueError(f"greedy_step and swap_size must be at least 1, got {greedy_step} and {swap_size}")
    h = h.double()
    w_hat = w_hat.to(h.device, torch.float64)
    groups = groups.to(h.device)
    fixed = fixed.to(h.device) if fixed is not None else None
    n = groups.shape[0]
    if not 1 <= keep <= n:
        raise ValueError(f"keep must lie in [1, {n}], got {keep}")
    st = _State(h, w_hat)
    kept = list(range(n))
    # greedy backward elimination, a few of the cheapest at a time
    step = greedy_step
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
    s = min(swap_size, len(kept), len(pruned))
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
