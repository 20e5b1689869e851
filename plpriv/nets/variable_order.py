"""Variable orders for a tensor train: raster, Hilbert curve, and orders learnt from data by mutual information.

A tensor train's bond ranks must carry every dependence between a prefix and a suffix of its variables, so the order
decides how large the ranks must be. Data-learnt orders here use the empirical mutual information of the TRAINING split
only (never validation or test rows):

* ``chow_liu``: depth-first preorder of the Chow-Liu tree (Chow & Liu 1968: the maximum spanning tree of pairwise MI),
  so every subtree is a contiguous block and strongly dependent pairs sit close in the chain;
* ``mi_chain``: greedy chain, start at the variable with the largest total MI and append the unused variable of
  largest MI with the last one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

ORDER_NAMES = ("raster", "hilbert", "chow_liu", "mi_chain")


def hilbert_order(height: int, width: int) -> list[int]:
    """Raster indices ``row * width + col`` of a ``height x width`` grid in Hilbert-curve order.

    The curve of the enclosing ``2^k x 2^k`` square (Hilbert 1891; the iterative d -> (x, y) map of Warren,
    "Hacker's Delight" 16-2), cells outside the grid skipped: every cell once, unit steps when the grid is that square.
    """
    if height < 1 or width < 1:
        raise ValueError(f"grid must be at least 1 x 1, got {height} x {width}")
    side = 1
    while side < max(height, width):
        side *= 2
    out = []
    for d in range(side * side):
        x = y = 0
        t, s = d, 1
        while s < side:  # one quadrant level per 2 bits of d
            rx = 1 & (t // 2)
            ry = 1 & (t ^ rx)
            if ry == 0:  # rotate the sub-square
                if rx == 1:
                    x, y = s - 1 - x, s - 1 - y
                x, y = y, x
            x, y = x + s * rx, y + s * ry
            t //= 4
            s *= 2
        if y < height and x < width:
            out.append(y * width + x)
    return out


def mutual_information(x: Tensor, pseudo_count: float = 0.5) -> Tensor:
    """Empirical pairwise mutual information (nats) of binary data ``[N, d]`` -> ``[d, d]`` (zero diagonal).

    I(i; j) = sum_{a,b} p(a, b) log p(a, b) / (p(a) p(b)), counts smoothed by ``pseudo_count`` per cell.
    """
    if x.ndim != 2 or (x.numel() and (x.min() < 0 or x.max() > 1)):
        raise ValueError(f"`x` must be binary [N, d], got shape {tuple(x.shape)}")
    x1 = x.double()
    x0 = 1 - x1
    n = x.shape[0] + 4 * pseudo_count
    joint = torch.stack([torch.stack([x0.T @ x0, x0.T @ x1]), torch.stack([x1.T @ x0, x1.T @ x1])])  # [2, 2, d, d]
    joint = (joint + pseudo_count) / n
    pi = joint.sum(1)  # [2(a), d(i), d(j)]: p(x_i = a), same for every j
    pj = joint.sum(0)  # [2(b), d(i), d(j)]
    mi = (joint * (joint.log() - pi[:, None].log() - pj[None].log())).sum((0, 1))
    return mi.fill_diagonal_(0.0).clamp_min(0.0)


def chow_liu_edges(mi: Tensor) -> list[tuple[int, int]]:
    """Maximum spanning tree of ``mi`` (scipy's minimum spanning tree of ``max - mi + 1``, all weights > 0 so no edge
    reads as absent) as (parent, child) edges in breadth-first order from root 0 (parents before children)."""
    import numpy as np
    from scipy.sparse.csgraph import breadth_first_order, minimum_spanning_tree

    w = mi.detach().double().cpu().numpy()
    cost = np.triu(w.max() - w + 1.0, k=1)
    tree = minimum_spanning_tree(cost)
    order, parent = breadth_first_order(tree, 0, directed=False, return_predecessors=True)
    return [(int(parent[j]), int(j)) for j in order[1:]]


def chow_liu_order(x: Tensor) -> list[int]:
    """Depth-first preorder of the Chow-Liu tree of ``x`` (children by decreasing MI), rooted at the variable of
    largest total MI."""
    mi = mutual_information(x)
    d = mi.shape[0]
    adj: dict[int, list[int]] = {i: [] for i in range(d)}
    for a, b in chow_liu_edges(mi):
        adj[a].append(b)
        adj[b].append(a)
    root = int(mi.sum(1).argmax())
    order, stack, seen = [], [root], {root}
    while stack:
        v = stack.pop()
        order.append(v)
        nxt = sorted((u for u in adj[v] if u not in seen), key=lambda u: float(mi[v, u]))
        seen.update(nxt)
        stack.extend(nxt)  # largest MI last, so visited first
    return order


def mi_chain_order(x: Tensor) -> list[int]:
    """Greedy chain: start at the variable of largest total MI, append the unused one of largest MI with the last."""
    mi = mutual_information(x)
    d = mi.shape[0]
    used = torch.zeros(d, dtype=torch.bool)
    cur = int(mi.sum(1).argmax())
    order = [cur]
    used[cur] = True
    for _ in range(d - 1):
        cur = int(mi[cur].masked_fill(used, -1.0).argmax())
        order.append(cur)
        used[cur] = True
    return order


def check_permutation(order: Sequence[int], num_vars: int) -> list[int]:
    """``order`` as a list of ints, validated to be a permutation of ``range(num_vars)``."""
    out = [int(v) for v in order]
    if sorted(out) != list(range(num_vars)):
        raise ValueError(f"`order` must be a permutation of range({num_vars}), got {out[:10]}{'...' * (len(out) > 10)}")
    return out


def resolve_order(
    order: str | Sequence[int] | None, num_vars: int, train: Tensor | None = None,
    grid: tuple[int, int] | None = None,
) -> list[int]:
    """The permutation for ``order``: position ``k`` of the chain holds variable ``result[k]``.

    ``raster``/None: identity; ``hilbert``: needs ``grid`` (default: a square grid when ``num_vars`` is a square);
    ``chow_liu``/``mi_chain``: need ``train`` (the training split only); a list of ints is validated and returned.
    """
    if order is None or order == "raster":
        return list(range(num_vars))
    if not isinstance(order, str):
        return check_permutation(order, num_vars)
    if order == "hilbert":
        if grid is None:
            side = round(num_vars**0.5)
            if side * side != num_vars:
                raise ValueError(f"order 'hilbert' needs a grid: {num_vars} variables are not a square; "
                                 "pass grid=(h, w)")
            grid = (side, side)
        if grid[0] * grid[1] != num_vars:
            raise ValueError(f"grid {grid} has {grid[0] * grid[1]} cells, expected num_vars = {num_vars}")
        return hilbert_order(*grid)
    if order in ("chow_liu", "mi_chain"):
        if train is None or train.ndim != 2 or train.shape[1] != num_vars:
            raise ValueError(f"order {order!r} is learnt from the training split: pass train [N, {num_vars}]")
        return chow_liu_order(train) if order == "chow_liu" else mi_chain_order(train)
    raise ValueError(f"unknown order {order!r}: use one of {ORDER_NAMES} or a permutation list")
