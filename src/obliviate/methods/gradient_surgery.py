"""The restricted-gradient rule of Ko et al. 2024 ("Boosting Alignment for Post-Unlearning Text-to-Image Generative
Models", NeurIPS 2024, https://arxiv.org/abs/2412.07808) and its diversified retain subset: model-agnostic, shared by
every family's RG/RGD (methods/lm/restricted_gradient.py, methods/t2i/grad_diff.py, where the formula is written out).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from obliviate.errors import ObliviateError
from obliviate.methods.common import check_number


def _dot(a: list, b: list, device) -> torch.Tensor:
    from obliviate import sharding

    if any(sharding.is_sharded(x) for x in a):  # FSDP2 shards: local sums, then summed over the processes
        return sharding.local_dot(a, b, device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in zip(a, b):
        if x is not None and y is not None:
            total = total + (x.double() * y.double()).sum().to(device)
    return total


def restrict(g_forget: list, g_retain: list) -> tuple[list, list, float]:
    """The seed paper's gradient restriction on the flattened concatenation of the tensors.

    Lists are aligned per parameter; an entry may be None (no gradient: treated as zero; stays None only when both
    entries are None). Returns (g_f', g_r', cosine of the ORIGINAL g_f and g_r; 0 when either is zero).
    Model-agnostic: used for language and diffusion models alike. Zero vectors are passed through unchanged."""
    if len(g_forget) != len(g_retain):
        raise ValueError(f"restrict: {len(g_forget)} forget gradients but {len(g_retain)} retain gradients")
    g_f, g_r = [], []
    for f, r in zip(g_forget, g_retain):
        if f is None and r is not None:
            f = torch.zeros_like(r)
        if r is None and f is not None:
            r = torch.zeros_like(f)
        g_f.append(f)
        g_r.append(r)
    present = [t for t in g_f if t is not None]
    if not present:
        return g_f, g_r, 0.0
    device = present[0].device
    s = _dot(g_f, g_r, device)
    nf2 = _dot(g_f, g_f, device)
    nr2 = _dot(g_r, g_r, device)
    denom = (nf2 * nr2).sqrt()
    cos = float(s / denom) if float(denom) > 0 else 0.0
    if not float(s) < 0:  # s < 0 implies both norms > 0
        return g_f, g_r, cos
    cf = float(s / nr2)  # g_f' = g_f - cf * g_r
    cr = float(s / nf2)  # g_r' = g_r - cr * g_f
    new_f = [None if f is None else f - cf * r for f, r in zip(g_f, g_r)]
    new_r = [None if r is None else r - cr * f for f, r in zip(g_f, g_r)]
    return new_f, new_r, cos


def restricted_sum(g_forget: list, g_retain: list, retain_weight: float) -> tuple[list, dict]:
    """The update direction g_f' + lambda * g_r' (None where neither term reaches a parameter), and logs: the cosine
    of the original g_f and g_r and whether they conflicted. Shared by the language-model and diffusion RG/RGD."""
    f, r, cos = restrict(g_forget, g_retain)
    out = [None if a is None else a + retain_weight * b for a, b in zip(f, r)]
    return out, {"grad_cosine": cos, "grad_conflict": float(cos < 0)}


def check_rgd_extras(config) -> None:
    """RGD's own settings (the language-model and diffusion RGD configs share them)."""
    size = config.diverse_retain_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ObliviateError(f"RGD: diverse_retain_size must be a positive integer, got {size!r}")
    if config.forget_loss_cap is not None:
        check_number("RGD", "forget_loss_cap", config.forget_loss_cap, positive=True)


def _shuffled(xs: list, rng) -> list:
    xs = list(xs)
    if rng is not None:
        rng.shuffle(xs)
    return xs


def _round_robin(groups: list[list]) -> list:
    out, i = [], 0
    while any(i < len(g) for g in groups):
        out.extend(g[i] for g in groups if i < len(g))
        i += 1
    return out


def balanced_subset(items: list, size: int, rng=None) -> list:
    """Up to `size` items balanced across `item.source`, and within a source across `item.subject`: round-robin
    over sources, each source's stream itself round-robin over its subjects. `rng` (random.Random or a numpy
    Generator; None keeps the input order) shuffles the order of sources, subjects and items."""
    by_source: OrderedDict = OrderedDict()
    for it in items:
        by_source.setdefault(getattr(it, "source", ""), OrderedDict()).setdefault(getattr(it, "subject", None), []) \
            .append(it)
    streams = []
    for source in _shuffled(list(by_source), rng):
        subjects = by_source[source]
        streams.append(_round_robin([_shuffled(subjects[s], rng) for s in _shuffled(list(subjects), rng)]))
    return _round_robin(streams)[:size]


def project_conflict(g: list, g_ref: list, scale: float = 1.0, per_tensor: bool = False) -> tuple[list, dict]:
    """One-sided gradient surgery (the rule of PCGrad, Yu et al. 2020, https://arxiv.org/abs/2001.06782, for one
    pair; DoCo's concept-preserving gradient): where <g, g_ref> < 0,

        g' = g - scale * <g, g_ref> / ||g_ref||^2 * g_ref

    (scale 1: the whole component of g against g_ref goes), else g' = g. g_ref is neither changed nor added: unlike
    `restrict`, which projects both gradients and whose callers step on their sum. Tested over the flattened
    concatenation of the tensors, or for each tensor on its own (`per_tensor`). Lists are aligned per parameter; None
    counts as zero (a None of g stays None where it is not projected). Returns (g', logs): the cosine of the original
    whole vectors and `grad_conflict`, the share of the tested blocks (tensors, or the one whole vector) that
    conflicted and were projected."""
    if len(g) != len(g_ref):
        raise ValueError(f"project_conflict: {len(g)} gradients but {len(g_ref)} reference gradients")
    present = [t for t in list(g) + list(g_ref) if t is not None]
    if not present:
        return list(g), {"grad_cosine": 0.0, "grad_conflict": 0.0}
    device = present[0].device
    blocks = [[i] for i in range(len(g))] if per_tensor else [list(range(len(g)))]
    out, conflicts = list(g), 0
    for block in blocks:
        a, b = [g[i] for i in block], [g_ref[i] for i in block]
        s = _dot(a, b, device)
        if not float(s) < 0:  # s < 0 implies ||b|| > 0
            continue
        coef = scale * float(s / _dot(b, b, device))
        for i in block:
            if g_ref[i] is not None:
                out[i] = (torch.zeros_like(g_ref[i]) if g[i] is None else g[i]) - coef * g_ref[i]
        conflicts += 1
    s, n2, n2_ref = _dot(g, g_ref, device), _dot(g, g, device), _dot(g_ref, g_ref, device)
    denom = (n2 * n2_ref).sqrt()
    cos = float(s / denom) if float(denom) > 0 else 0.0
    return out, {"grad_cosine": cos, "grad_conflict": conflicts / len(blocks)}


def gem_project(gradient: list, memories: list[list], margin: float = 0.5, eps: float = 1e-3) -> tuple[list, dict]:
    """Gradient Episodic Memory's projection (Lopez-Paz and Ranzato 2017, https://arxiv.org/abs/1706.08840), as
    ScissorHands' repair phase uses it: when the proposed gradient g conflicts with any memory gradient m_j
    (<g, m_j> < 0), solve GEM's dual quadratic programme

        min_v  1/2 v^T (M M^T + eps I) v + (M g)^T v   subject to  v >= margin      (M: the memories as rows)

    and step along g~ = g + M^T v; otherwise g is returned unchanged. Lists are aligned per parameter (None: no
    gradient, treated as zero). One memory has the closed form v = max(-<g, m> / (|m|^2 + eps), margin); several
    are solved as the bounded least-squares problem it is (scipy's BVLS, exact). After it <g~, m_j> >= -eps v_j (the
    ridge's slack). Logs: whether it projected and the smallest <g, m_j> before and after the projection."""
    if not memories:
        raise ObliviateError("gem_project: no memory gradients")
    present = [t for t in gradient if t is not None] + [t for m in memories for t in m if t is not None]
    if not present:
        return list(gradient), {"gem_projected": 0.0, "gem_dot": 0.0, "gem_dot_after": 0.0}
    device = present[0].device
    rows = [list(gradient)] + [list(m) for m in memories]
    for i in range(len(gradient)):  # a parameter some rows reach and others not: zeros for the others
        like = next((r[i] for r in rows if r[i] is not None), None)
        for r in rows:
            if r[i] is None and like is not None:
                r[i] = torch.zeros_like(like)
    g, mems = rows[0], rows[1:]
    dots = torch.stack([_dot(g, m, device) for m in mems]).cpu()  # <g, m_j>, float64
    logs = {"gem_dot": float(dots.min()), "gem_projected": 0.0, "gem_dot_after": float(dots.min())}
    if not bool((dots < 0).any()):
        return g, logs
    gram = torch.stack([torch.stack([_dot(a, b, device) for b in mems]) for a in mems]).cpu()
    gram = 0.5 * (gram + gram.T) + eps * torch.eye(len(mems), dtype=gram.dtype)
    if len(mems) == 1:
        v = torch.clamp(-dots / gram[0, 0], min=margin)
    else:  # 1/2 v'Pv + c'v with P = L L': the least squares |L'v + L^-1 c|^2 under v >= margin
        import numpy as np
        from scipy.optimize import lsq_linear

        chol = torch.linalg.cholesky(gram)
        rhs = -torch.linalg.solve_triangular(chol, dots.view(-1, 1), upper=False).view(-1)
        v = torch.from_numpy(lsq_linear(chol.T.numpy(), rhs.numpy(), bounds=(margin, np.inf), method="bvls",
                                        tol=1e-12).x)
    out = []
    for i, a in enumerate(g):
        if a is None:
            out.append(None)
            continue
        step = a.clone()
        for j, m in enumerate(mems):
            step.add_(m[i], alpha=float(v[j]))
        out.append(step)
    logs["gem_projected"] = 1.0
    logs["gem_dot_after"] = float(min(_dot(out, m, device) for m in mems))
    return out, logs
