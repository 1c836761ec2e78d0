"""
GaLore (Gradient Low-Rank Projection): AdamW whose moments live in a small subspace of each weight matrix's
gradient, so that training takes less optimizer memory. The weights are not factored: each step is low rank, but
the subspace is renewed every few hundred steps, and the steps add up to a full-rank change.

Paper: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", arXiv 2403.03507.

This file imports torch only: copy it into your project and use it like the official package,

    from galore import GaLoreAdamW, galore_param_groups
    groups = galore_param_groups(model, rank=128, update_proj_gap=200, scale=0.25)
    opt = GaLoreAdamW(groups, lr=0.01)          # then opt.step() / opt.zero_grad() as usual

or with hand-made groups in the official format (a group with a 'rank' key is projected):

    opt = GaLoreAdamW([{'params': other},
                       {'params': matrices, 'rank': 128, 'update_proj_gap': 200, 'scale': 0.25}], lr=0.01)

Memory: AdamW keeps two moments for every weight, 2mn numbers for an m x n matrix. GaLore keeps them for the
projected gradient, r x max(m, n), plus the projector, r x min(m, n): 2 r max(m, n) + r min(m, n) numbers.

Reading order: the class docstring (the algorithm as maths), then the core, up to the banner EXTRAS: that is the
whole of the paper's optimizer. The extras (faster refreshes, Fira's residual, the batched step, per-layer updates,
checkpoints) can be skipped; NOTES, last, gives the differences from the official code and the measured figures.
"""

import math
import numbers

import torch
import torch.distributed as dist


def right_side(shape):
    """The one rule for the side: P acts from the right (R = G P^T, P r x n) when W is tall or square, m >= n,
    and from the left (R = P^T G, P m x r) when W is wide. Either way P spans the smaller side."""
    return shape[-2] >= shape[-1]


class GaLoreAdamW(torch.optim.Optimizer):
    r"""AdamW whose moments live in a rank-r subspace of each projected matrix's gradient.

    Symbols, the paper's: W a projected weight (m x n) and G its gradient; r the group's 'rank'; P the projector;
    R the projected gradient; M and V Adam's moments of R, k their age; N the normalized Adam step; alpha the
    group's 'scale'; T the group's 'update_proj_gap'; s the optimizer's step counter (`steps_taken`).

    The update of W at step s (Algorithm 1 of the paper; `_update` does these lines, each of the paper's statements
    a comment on the line that does it):

        G  = dL/dW                                                    (m x n)     p.grad
        if s is a refresh step (schedule below):
            U, _, Vh = svd(G)                        exact, in fp32                projector()
            P = Vh[:r]     (r x n)   if m >= n:  "right", R = G P^T
            P = U[:, :r]   (m x r)   if m <  n:  "left",  R = P^T G
            M = V = 0, k = 0                         at the first P always; later if reset_on_update
        R  = G P^T  (m x r)   or   P^T G  (r x n)                                 project()
        k  = k + 1
        M  = beta1 M + (1 - beta1) R                                 first moment, R's shape
        V  = beta2 V + (1 - beta2) R * R                             second moment, R's shape
        N  = (M / (1 - beta1^k)) / (sqrt(V / (1 - beta2^k)) + eps)   normalized Adam step, R's shape
        W  = W * (1 - lr * weight_decay)                             decoupled weight decay, all of W
        W  = W - lr * alpha * (N P  or  P N)                         projected back, m x n  project_back()

    P spans the smaller side of W (the paper's 'std' rule), so M and V keep the larger one. A tensor in a group
    without 'rank', and a matrix with r >= min(m, n) (nothing to compress), take the same lines with P = identity
    and alpha = 1: that is torch.optim.AdamW exactly (decay first, eps added after the bias correction), given the
    same hyperparameters (weight_decay defaults to 0 here, to 0.01 in torch).

    Schedule, one counter s for every matrix (s0 = proj_start_steps):
      * s < s0: full-rank warmup: every parameter takes AdamW steps with full-size moments, a matrix its group will
        project at lr x alpha (the step size it keeps after the switch; residual=True's part outside the subspace
        steps at lr), everything else at lr;
      * s = s0: the switch: every projected matrix gets its first P (a matrix with no gradient then, at its first);
      * s = s0 + j T, j = 1, 2, ...: every projected matrix that has a gradient gets a new P.

    svd='full' computes every P by the exact SVD above. The default, svd='subspace', takes the first P from the SVD
    and every later one by one cheaper step of subspace iteration from the P it replaces; svd='randomized' takes
    every P from torch.svd_lowrank, an approximation (EXTRAS: faster refreshes). residual=True adds the part of G
    outside P's subspace to the update (EXTRAS: Fira's residual). foreach: None batches same-shaped matrices on
    CUDA (EXTRAS: the batched step), True/False forces it on/off.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 proj_start_steps=0, reset_on_update=True, svd="subspace", residual=False, foreach=None):
        # `not 0.0 <= x` is also True for NaN, so a NaN hyperparameter is refused too.
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr} (must be a number >= 0)")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps} (must be a number >= 0)")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta} (must be in [0, 1))")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be a number >= 0)")
        if not (_is_int(proj_start_steps) and proj_start_steps >= 0):
            raise ValueError(f"Invalid proj_start_steps: {proj_start_steps} (must be an int >= 0)")
        if reset_on_update not in (True, False):
            raise ValueError(f"Invalid reset_on_update: {reset_on_update!r} (use True or False)")
        if foreach not in (None, True, False):
            raise ValueError(f"Invalid foreach: {foreach!r} (True: the batched step, False: one matrix at a time, "
                             "None: batched on CUDA only)")
        self.proj_start_steps = int(proj_start_steps)
        self.reset_on_update = reset_on_update
        self.foreach = foreach
        self.steps_taken = 0  # s, the optimizer-level step counter; saved in state_dict()
        # Per-layer updates only (EXTRAS): p -> (group position, index in group), and per step in progress the
        # micro-batches seen per parameter, each projected matrix's R summed so far and its sketch Y of the next P.
        # Gradients, not optimizer state: zero_grad() forgets them.
        self._where, self._seen, self._pending, self._sketch = {}, {}, {}, {}
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, svd=svd, residual=residual)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        # Called by Optimizer.__init__ for every group: each group is validated once, here, never in step().
        super().add_param_group(param_group)  # torch turns (name, tensor) pairs into params + param_names
        group = self.param_groups[-1]
        try:
            _check_group(group)  # also fills a GaLore group's defaults: T = 200, alpha = 0.25, proj_type 'std'
        except ValueError:
            self.param_groups.pop()  # a refused group is not kept
            raise
        for i, p in enumerate(group["params"]):
            self._where[p] = (len(self.param_groups) - 1, i)

    # == CORE 1/2: the projector, one rule for the side ===========================================================
    # projector, project and project_back take one matrix (m, n) or a stack (L, m, n): the batched step uses them too.
    @staticmethod
    def projector(G, rank, svd="full", P=None):
        """P for G (m x n): its top-`rank` right singular vectors as rows, r x n, if m >= n; else its top-`rank`
        left singular vectors as columns, m x r. Orthonormal rows (or columns) in fp32, returned in G's dtype.
        svd='subspace' with the previous P, or svd='randomized': the faster refreshes (EXTRAS). A staticmethod:
        call it on any matrix or stack, or override it on an instance to time or record the refreshes."""
        if svd == "randomized" or (svd == "subspace" and P is not None):
            P = GaLoreAdamW.fast_projector(G, rank, svd, P)
        else:
            # In fp32 whatever the parameter dtype: torch has no bf16 SVD, and bf16 would be too coarse anyway.
            U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)  # U (m, q), Vh (q, n), q = min(m, n)
            P = Vh[..., :rank, :] if right_side(G.shape) else U[..., :rank]  # (r, n) or (m, r)
        # A copy into storage of exactly P's size: Vh[:r] can be a view that would keep all of Vh (q x n) alive.
        P = P.to(G.dtype, memory_format=torch.contiguous_format, copy=True)
        return same_on_all_processes(P)  # (a no-op unless torch.distributed runs: see that function)

    @staticmethod
    def project(G, P):
        # right: (m, n) @ (n, r) -> R (m, r);  left: (r, m) @ (m, n) -> R (r, n)
        return G @ P.mT if right_side(G.shape) else P.mT @ G

    @staticmethod
    def project_back(N, P, shape):
        # right: (m, r) @ (r, n) -> (m, n);   left: (m, r) @ (r, n) -> (m, n). `shape`: W's, which sets the side.
        return N @ P if right_side(shape) else P @ N

    @staticmethod
    def low_rank(p, group):
        """Whether p's group trains it in a subspace once the warmup is over (not if r >= min(m, n))."""
        return "rank" in group and group["rank"] < min(p.shape)

    def projects(self, p, group):
        """Whether p is trained in its rank-r subspace at this step: low_rank, and the warmup is over."""
        return self.low_rank(p, group) and self.steps_taken >= self.proj_start_steps

    # == CORE 2/2: the step ========================================================================================
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._finish_pending()  # per-layer updates (EXTRAS): update what a backward hook left half-accumulated
        for group in self.param_groups:
            # foreach=None: batched on CUDA, where kernel launches cost; on a CPU the loop is faster.
            if self.foreach or (self.foreach is None and any(p.is_cuda for p in group["params"])):
                self._batched_update(group)  # the same numbers as the loop below (EXTRAS: the batched step)
                continue
            for i, p in enumerate(group["params"]):
                if p.grad is not None:  # no gradient, no update, as torch.optim.AdamW
                    self._update(p, group, i)
        self.steps_taken += 1
        return loss

    def _refresh_due(self, state, group):
        """(compute P now, zero the moments now) for a matrix that is projected at this step."""
        first = "P" not in state  # the switch, or this matrix's first gradient after it
        refresh = first or (self.steps_taken - self.proj_start_steps) % group["update_proj_gap"] == 0
        return refresh, first or (refresh and self.reset_on_update)

    @staticmethod
    def _reset(state):
        # Zeroing M and V alone would not do: Adam divides by (1 - beta^k) to undo their zero start, and with k
        # still large that correction is ~1. The first update would then be (1 - beta1) R / sqrt((1 - beta2) R^2)
        # = 0.1 / 0.032 ~ 3.2x the size of a normal Adam step. Restarting k makes it an ordinary first Adam step.
        # At the switch this also frees the warmup's full-size (m, n) moments.
        for key in ("exp_avg", "exp_avg_sq", "step"):
            state.pop(key, None)

    def _update(self, p, group, i, R=None):
        """Algorithm 1 for one parameter p, top to bottom. R: p's gradient already projected (per-layer updates
        sum it over micro-batches, EXTRAS); None: projected here from p.grad."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        projected = self.projects(p, group)  # False in warmup and for an unprojected tensor: P = identity, R = G
        alpha = group["scale"] if self.low_rank(p, group) else 1.0  # the warmup too steps at lr x alpha

        if R is None:
            G = _dense_grad(p, group, i)  # (m, n) for a matrix      Alg. 1: G_t (the paper's is minus the gradient)
            R = G
            if projected:
                refresh, reset = self._refresh_due(state, group)
                if refresh:                                           # Alg. 1: if t mod T = 0 (its t: s - s0)
                    # Alg. 1: P_t = U[:, :r] of SVD(G_t) (the left side, m <= n; a square W takes the right side
                    # here); between refreshes P_t = P_t-1
                    state["P"] = self.projector(G, group["rank"], group["svd"], state.get("P"))  # (r, n) or (m, r)
                if reset:
                    self._reset(state)
                R = self.project(G, state["P"])  # (m, r) or (r, n)  Alg. 1: R_t = P_t^T G_t

        if "step" not in state:
            state["step"] = 0                                                   # k, the moments' age
            state["exp_avg"] = torch.zeros_like(R, memory_format=torch.preserve_format)     # M, R's shape
            state["exp_avg_sq"] = torch.zeros_like(R, memory_format=torch.preserve_format)  # V, R's shape
        M, V = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        k = state["step"]

        M.lerp_(R, 1 - beta1)                                  # Alg. 1: M_t = beta1 M_t-1 + (1 - beta1) R_t
        V.mul_(beta2).addcmul_(R, R, value=1 - beta2)          # Alg. 1: V_t = beta2 V_t-1 + (1 - beta2) R_t^2
        bias_correction1 = 1 - beta1 ** k                      # Alg. 1: M_t / (1 - beta1^t), applied below (its t
        bias_correction2 = 1 - beta2 ** k                      # is k here); Alg. 1: V_t / (1 - beta2^t), here:
        denom = (V.sqrt() / math.sqrt(bias_correction2)).add_(eps)  # sqrt(V_hat) + eps

        if wd != 0:  # (multiplying by 1 would change no number, but costs a pass over W)
            p.mul_(1 - lr * wd)                                # decoupled weight decay on the whole W
        if projected:
            N = M / denom / bias_correction1                   # Alg. 1: N_t = M_t / (sqrt(V_t) + eps), R's shape
            if group["residual"]:  # N P + (phi / alpha) S: the rest of G, at lr once scaled below (EXTRAS)
                update, state["residual_norm"] = self.residual_step(p.grad, R, N, state["P"], alpha,
                                                                    state.get("residual_norm"))
            else:
                update = self.project_back(N, state["P"], p.shape)  # (m, n)  Alg. 1: G~_t = alpha P_t N_t
            # Alg. 1: W_t = W_t-1 + eta G~_t: a subtraction here, since the paper's G_t is minus the gradient
            p.add_(update, alpha=-lr * alpha)
        else:
            p.addcdiv_(M, denom, value=-lr * alpha / bias_correction1)  # plain AdamW at lr x alpha, as torch's

    # ==============================================================================================================
    # EXTRAS. The core above is the whole of GaLore. What follows makes it cheaper, faster, or usable in more
    # training setups; each section calls into the core, and none is needed to understand it.
    # ==============================================================================================================

    # -- Faster refreshes (svd='subspace', the default, and svd='randomized') ------------------------------------
    # An exact SVD of every matrix at every refresh is the costliest thing GaLore does. The gradient's top
    # subspace drifts slowly, so the previous P is a good start: one step of subspace (orthogonal) iteration,
    #     Y = G^T G P^T (n x r)  ->  P = an orthonormal basis of Y's columns (QR), as rows     (mirrored if m < n)
    # is two matmuls and a thin QR instead of an SVD. Repeated at every refresh it is the power method, so P
    # follows the top-r subspace as it drifts; it is an approximation of the exact SVD's P, not that P.
    # svd='randomized' is torch.svd_lowrank (Halko et al. 2011): a random sketch and two power iterations, also an
    # approximate subspace. The first P of svd='subspace', with no P to start from, is the exact SVD's.
    @staticmethod
    def fast_projector(G, rank, svd, P=None):
        """P (not yet copied or broadcast: projector() does that) by one power step from P, or svd_lowrank."""
        right = right_side(G.shape)
        if svd == "subspace":
            # A = G (m >= n) or G^T, so that P's directions are A's right singular vectors: Q (n', r), n' = min(m, n).
            A, Q = (G.float(), P.float().mT) if right else (G.float().mT, P.float())
            Q = GaLoreAdamW.orthonormal(A.mT @ (A @ Q))  # (n', r): one power step on A^T A from the old subspace
            return Q.mT if right else Q                  # (r, n) rows or (m, r) columns
        U, _, Vr = torch.svd_lowrank(G.float(), q=rank, niter=2)  # U (m, r), Vr (n, r): only the top `rank`
        return Vr.mT if right else U

    @staticmethod
    def orthonormal(Y):
        """An orthonormal basis of Y's columns (Y: n' x r, n' >= r), in order (Gram-Schmidt's, by QR), each column
        on its Y column's side."""
        Q, Rq = torch.linalg.qr(Y)
        # QR fixes each column only up to sign (LAPACK's choice, not ours). diag(Rq) >= 0 puts column j on the
        # side of Y_j, which leans toward the old direction j (p_j . Y_j = |A p_j|^2 >= 0): on a gradient that
        # moved little P comes back nearly unchanged, so moments kept by reset_on_update=False stay meaningful.
        return Q * torch.where(Rq.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-2)

    # -- Fira's residual (residual=True; beyond the paper) ---------------------------------------------------------
    # GaLore steps W only inside P's subspace; the rest of the gradient, S = G - (R projected back), is dropped at
    # every step. Fira (Chen et al. 2024, arXiv 2410.01623) adds it, scaled to the size of an Adam step without
    # keeping Adam's moments for it. For the right side, with X_i for row i of X (the left side is the same with
    # columns: phi (1 x n) scales the columns of S: W -= lr (alpha P N + S diag(phi))):
    #     phi_i  = ||N_i|| / (||R_i|| + 1e-8)     phi (m x 1): row i's Adam step per unit of its gradient in r-space
    #     S      = G - R P                        (m x n)   the part of G outside the subspace
    #     W      = W - lr * (alpha N P + phi S)             phi S: row i of S times phi_i
    # and a norm-growth limiter: if ||phi S|| > gamma x last step's (gamma = 1.01), phi shrinks to make it gamma x
    # (the last norm is kept across refreshes, as Fira's code keeps it). State added: that norm, one number per
    # matrix. The residual is not scaled by alpha, as in Fira (whose S differs: NOTES): alpha shrinks the step
    # inside the subspace only; scaling the residual too ended 1.6% (rank width/4) and 3.6% (width/8) higher in
    # final loss at this project's long horizon (docs/quality.md).
    # Computed without S itself: alpha N P + phi S = alpha ((N - (phi / alpha) R) P + (phi / alpha) G), and
    # ||phi S||^2 = sum_i phi_i^2 (||G_i||^2 - ||R_i||^2), since R_i P = G_i P^T P is G_i's projection onto P's
    # rows (P P^T = I). Where it differs from Fira's code, see NOTES.
    @staticmethod
    def residual_step(G, R, N, P, alpha, last_norm, gamma=1.01):
        """(N P + (phi / alpha) S, ||phi S||), phi after the limiter, for one matrix, or a stack (L, ...) with
        last_norm (L,): the caller steps by lr x alpha times the first. last_norm: None at the first projected step
        (no limit then; later refreshes keep it)."""
        dim = -1 if right_side(G.shape) else -2  # one phi per row of R (m, r), or per column of R (r, n)
        acc = torch.float64 if G.dtype == torch.float64 else torch.float32  # norms in fp32 (bf16 G too) or fp64
        norm = lambda X: torch.linalg.vector_norm(X, dim=dim, keepdim=True, dtype=acc)
        G2, R2 = norm(G).square(), norm(R).square()  # (m, 1) or (1, n)
        phi = norm(N) / (R2.sqrt() + 1e-8)           # (m, 1) or (1, n)
        S_norm = (phi.square() * (G2 - R2).clamp_(min=0)).sum((-2, -1), keepdim=True).sqrt_()  # ||phi S||, (1, 1)
        if last_norm is not None:  # the norm-growth limiter
            limiter = (S_norm / (last_norm.view(S_norm.shape) + 1e-8)).clamp_(min=gamma) / gamma
            phi, S_norm = phi / limiter, S_norm / limiter
        phi = (phi / alpha).to(G.dtype)  # from here phi / alpha: the caller scales the update by lr x alpha
        update = GaLoreAdamW.project_back(N - phi * R, P, G.shape).addcmul_(G, phi)  # (m, n): N P + (phi/alpha) S
        # In W's dtype, as torch's load_state_dict would cast it: a resumed bf16 run then takes the same steps.
        return update, S_norm.view(S_norm.shape[:-2]).to(G.dtype)

    # -- The batched step (foreach=True, and None on CUDA) --------------------------------------------------------
    # On a GPU every tensor operation is a kernel launch of 5-10 us, and _update makes 11 per matrix: 1,106
    # launches per step at 125M, more time than the arithmetic. Here the matrices of one group that share shape,
    # dtype, device and moments' age k are stacked, (L, m, n), and go through the lines of _update together:
    # one batched matmul projects, one _foreach_* op per moment line, one batched matmul projects back. That is
    # ~14 launches per stack plus 7 for all the unprojected tensors at once (torch.optim.AdamW's foreach). The
    # numbers are _update's: the same operations in the same order (equal to the last bit on a CPU, tested).
    max_stack_numel = 2 ** 26  # a stack's G and update are temporaries: at most 64M numbers (256 MB in fp32)

    def _batched_update(self, group):
        buckets = {}  # what the matrices of one stack share -> [params]
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            _dense_grad(p, group, i)  # dense, or a one-line error
            state, projected = self.state[p], self.projects(p, group)
            refresh, reset = self._refresh_due(state, group) if projected else (False, False)
            k = 0 if reset else state.get("step", 0)  # the moments' age once this step's reset is done
            key = (projected, refresh, "P" in state, k, tuple(p.shape) if projected else None,
                   group["scale"] if self.low_rank(p, group) else 1.0, "residual_norm" in state, p.dtype, p.device)
            buckets.setdefault(key, []).append(p)
        for (projected, refresh, has_P, k, shape, alpha, *_), params in buckets.items():
            # Unprojected tensors go in one call (foreach takes any shapes); matrices in stacks of at most
            # max_stack_numel numbers, as even as possible (24 matrices that fit 20 at a time go 12 + 12).
            per_stack = len(params) if not projected else max(1, self.max_stack_numel // math.prod(shape))
            per_stack = math.ceil(len(params) / math.ceil(len(params) / per_stack))
            for j in range(0, len(params), per_stack):
                self._update_stack(params[j:j + per_stack], group, projected, refresh, has_P, k, alpha)

    def _update_stack(self, params, group, projected, refresh, has_P, k, alpha):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        states = [self.state[p] for p in params]
        if projected:
            G = torch.stack([p.grad for p in params])                          # (L, m, n)
            if refresh:
                P = self.projector(G, group["rank"], group["svd"],             # (L, r, n) or (L, m, r)
                                   torch.stack([st["P"] for st in states]) if has_P else None)
                for st, P_i in zip(states, P):
                    st["P"] = P_i.clone()  # each its own storage: one state entry per parameter, as _update's
                    if k == 0:
                        self._reset(st)
            else:
                P = torch.stack([st["P"] for st in states])                    # (L, r, n) or (L, m, r)
            R = list(self.project(G, P))                                       # L x (m, r) or (r, n)
            if not group["residual"]:  # (the residual needs G until the update)
                del G  # the stack of gradients is freed before the stack of updates is made
        else:
            R = [p.grad for p in params]                                       # P = identity, alpha = 1
        if k == 0:
            for st, R_i in zip(states, R):
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(R_i, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(R_i, memory_format=torch.preserve_format)
        M, V = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        for st in states:
            st["step"] += 1
        k += 1

        torch._foreach_lerp_(M, R, 1 - beta1)                   # M = beta1 M + (1 - beta1) R
        torch._foreach_mul_(V, beta2)                           # V = beta2 V + (1 - beta2) R * R
        torch._foreach_addcmul_(V, R, R, value=1 - beta2)
        bias_correction1, bias_correction2 = 1 - beta1 ** k, 1 - beta2 ** k
        denom = torch._foreach_sqrt(V)                          # sqrt(V_hat) + eps
        torch._foreach_div_(denom, math.sqrt(bias_correction2))
        torch._foreach_add_(denom, eps)
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        if projected:
            N = torch._foreach_div(M, denom)                     # N = M / denom / bias_correction1
            torch._foreach_div_(N, bias_correction1)
            if group["residual"]:
                last = torch.stack([st["residual_norm"] for st in states]) if "residual_norm" in states[0] else None
                update, norms = self.residual_step(G, torch.stack(R), torch.stack(N), P, alpha, last)  # (L, m, n)
                for st, norm in zip(states, norms.unbind()):  # views of one (L,) tensor: no launch per matrix
                    st["residual_norm"] = norm
            else:
                update = self.project_back(torch.stack(N), P, params[0].shape)  # (L, m, n)
            torch._foreach_add_(params, list(update), alpha=-lr * alpha)
        else:
            torch._foreach_addcdiv_(params, M, denom, value=-lr * alpha / bias_correction1)

    # -- Per-layer updates, with or without gradient accumulation (attach_per_layer_updates) ----------------------
    # LOMO's trick (Lv et al. 2023), which the paper uses for its memory figures: each weight is updated inside
    # backward as soon as its gradient is complete, and the gradient is freed. With N micro-batches a projected
    # matrix keeps only R summed over them: sum_i P^T G_i = P^T (G_1 + ... + G_N), the accumulated G's R.
    # On a refresh step that G is never held, so P comes in two parts, whatever svd is set to: this step's P from
    # the first micro-batch's G_1 alone; the next step's, P_next = orth(Y), from a sketch Y (P's size) to which
    # micro-batch i adds G_i^T (R_<i + R_<=i), R_<i the sum before it (mirrored for a wide matrix). Over the step
    #     Y = (sum_i G_i^T G_i + 2 sum_{j<i} G_i^T G_j) P^T,
    # a symmetrised estimate of the power step G^T G P^T, not that step: G_j^T G_i is taken as G_i^T G_j, since
    # G_j is gone when G_i arrives. At 128 x 64, rank 8, 4 micro-batches it was 46-49% off in norm for independent
    # random G_i, 7-8% when they share a mean (as real micro-batches largely do); 0.27% in final loss (NOTES).
    @torch.no_grad()
    def step_param(self, p, micro_batches=1):
        """Called from a backward hook each time p's gradient of a micro-batch is complete. On the
        `micro_batches`-th call of this step p is updated, with the schedule of the step in progress, and p.grad
        is freed; before that, a projected matrix's G_i is projected and freed, and an unprojected tensor's keeps
        summing into p.grad. Call step() once after the last backward: it updates what is still pending (a
        parameter that got fewer gradients) and advances s."""
        if p not in self._where:
            raise KeyError("step_param: this tensor is not a parameter of the optimizer")
        g, i = self._where[p]
        group = self.param_groups[g]
        self._seen[p] = self._seen.get(p, 0) + 1
        if micro_batches > 1 and self.projects(p, group):
            if group["residual"]:
                raise ValueError(_RESIDUAL_ACCUMULATION)
            self._accumulate(p, group, i)
            p.grad = None  # now in R
        if self._seen[p] == micro_batches:
            self._finish(p, group, i)

    def _accumulate(self, p, group, i):
        """R += P^T G_i, and Y += G_i^T (R_<i + R_<=i) on a refresh step; the first micro-batch sets P."""
        state, G = self.state[p], _dense_grad(p, group, i)
        if p in self._pending:                    # a later micro-batch
            R_i = self.project(G, state["P"])
            if p in self._sketch:
                self._sketch[p].add_(_sketch_term(G, 2 * self._pending[p] + R_i))
            self._pending[p].add_(R_i)
            return
        if "P_next" in state:                     # the first: last step's P_next takes over, then refresh if due
            self._take_P_next(p, state, group)
        # A run cut short mid-accumulation and resumed repeats the step on the P it already made ('refreshed_at').
        if state.get("refreshed_at") != self.steps_taken:
            refresh, reset = self._refresh_due(state, group)
            if refresh:
                state["P"] = self.projector(G, group["rank"], group["svd"], state.get("P"))
                state["refreshed_at"] = self.steps_taken
            if reset:
                self._reset(state)  # the old moments are freed now, not at the update
        self._pending[p] = self.project(G, state["P"])
        if state.get("refreshed_at") == self.steps_taken:
            self._sketch[p] = _sketch_term(G, self._pending[p])

    def _finish(self, p, group, i):
        """The update of p at the end of its accumulation, and P_next from its sketch Y."""
        Y = self._sketch.pop(p, None)
        if Y is not None:  # the subspace refresh's QR and sign rule, on the sketch of the whole step's G
            Q = self.orthonormal(Y)
            self.state[p]["P_next"] = (Q.mT if right_side(p.shape) else Q).to(p.dtype, copy=True)
        self._update(p, group, i, self._pending.pop(p, None))
        self.state[p].pop("refreshed_at", None)
        p.grad = None

    def _finish_pending(self):
        for p in list(self._pending):
            g, i = self._where[p]
            self._finish(p, self.param_groups[g], i)
        self._seen.clear()

    def _take_P_next(self, p, state, group):
        """P_next replaces P (the step after a refresh with accumulation). With reset_on_update the moments are
        one step old, M = (1 - beta1) R and V = (1 - beta2) R^2 of the refresh step's R on the old P: they are
        projected onto the new P, R' = R P_old P^T (or P^T P_old R), as if that step had been taken on it with the
        part of G the old P saw. (Zeroed instead, the next update would be a second first step of Adam in a row:
        0.7% worse in final loss, measured.) Without the reset the moments are kept, as at any refresh."""
        P_old, P = state["P"], state.pop("P_next")
        state["P"] = P
        if self.reset_on_update and state.get("step") == 1:
            beta1, beta2 = group["betas"]
            M = state["exp_avg"]
            if right_side(p.shape):  # M (m, r) @ (r, n) @ (n, r)
                M_new = M.float() @ (P_old.float() @ P.float().mT)
            else:                    # (r, m) @ (m, r) @ M (r, n)
                M_new = (P.float().mT @ P_old.float()) @ M.float()
            M.copy_(M_new)                                                      # (1 - beta1) R'
            state["exp_avg_sq"].copy_(M_new.square_().mul_((1 - beta2) / (1 - beta1) ** 2))  # (1 - beta2) R'^2

    def zero_grad(self, set_to_none=True):
        # What step_param summed is gradients too: forgotten with the others.
        self._seen.clear()
        self._pending.clear()
        self._sketch.clear()
        super().zero_grad(set_to_none)

    # -- Checkpoints: s is part of the state, so a resumed run keeps its schedule ---------------------------------
    # The per-parameter state is tensors and ints only (P, exp_avg, exp_avg_sq, step; residual_norm, P_next and
    # refreshed_at with the extras above), so torch.load(weights_only=True) reads a checkpoint.
    def state_dict(self):
        state_dict = super().state_dict()
        state_dict["steps_taken"] = self.steps_taken
        return state_dict

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.steps_taken = state_dict.pop("steps_taken", 0)
        super().load_state_dict(state_dict)  # the groups are now the saved ones: saved before residual existed?
        for group in self.param_groups:
            group.setdefault("residual", False)


# -- Helpers of the class above -----------------------------------------------------------------------------------
def same_on_all_processes(P):
    """DDP: every rank holds the same all-reduced G, but an SVD may flip the sign of a singular vector, and ranks
    could flip differently (a randomized SVD even draws a different sketch on each). Rank 0's P is used by all."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(P, src=0)
    return P


def _sketch_term(G, S):
    # right (m >= n): G^T S (n, r) with S (m, r);  left: G S^T (m, r) with S (r, n). In fp32, as the SVD. Y is
    # P's size; the refresh step holds it where the moments its reset freed were.
    return G.float().mT @ S.float() if right_side(G.shape) else G.float() @ S.float().mT


def _dense_grad(p, group, i):
    if p.grad.is_sparse:
        raise RuntimeError(f"GaLoreAdamW does not support sparse gradients (parameter {_name(group, i)}); "
                           "use dense gradients, e.g. nn.Embedding(sparse=False)")
    return p.grad


def _check_group(group):
    if "rank" in group:
        group.setdefault("update_proj_gap", 200)
        group.setdefault("scale", 0.25)
        group.setdefault("proj_type", "std")
        if not (_is_int(group["rank"]) and group["rank"] > 0):
            raise ValueError(f"Invalid rank: {group['rank']} (must be an int > 0)")
        if not (_is_int(group["update_proj_gap"]) and group["update_proj_gap"] > 0):
            raise ValueError(f"Invalid update_proj_gap: {group['update_proj_gap']} (must be an int > 0)")
        group["rank"], group["update_proj_gap"] = int(group["rank"]), int(group["update_proj_gap"])  # numpy's too
        if not (isinstance(group["scale"], numbers.Real) and 0.0 < group["scale"]):
            raise ValueError(f"Invalid scale (alpha): {group['scale']} (must be a number > 0)")
        if group["proj_type"] != "std":
            raise ValueError(f"Unsupported proj_type: {group['proj_type']!r}. This implementation has only "
                             "'std' (project on the smaller side of each matrix); use proj_type='std'")
    if group["svd"] not in ("full", "randomized", "subspace"):  # per group: a group may set its own
        raise ValueError(f"Invalid svd: {group['svd']!r} (use 'full', 'randomized' or 'subspace')")
    if group["residual"] not in (True, False):
        raise ValueError(f"Invalid residual: {group['residual']!r} (use True or False)")
    for i, p in enumerate(group["params"]):
        if p.is_complex():  # the SVD would drop the imaginary part, and V = R * R would not be |R|^2
            raise ValueError(f"parameter {_name(group, i)} is complex ({p.dtype}): GaLoreAdamW trains real "
                             "tensors only; use torch.optim.AdamW for it")
        if "rank" in group and p.dim() != 2:
            raise ValueError(f"GaLore projects 2-D matrices only, but parameter {_name(group, i)} has shape "
                             f"{tuple(p.shape)}: put it in a param group without 'rank'")


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)  # 4 and numpy.int64(4), not True


def _name(group, i):
    names = group.get("param_names")
    return repr(names[i]) if names else f"#{i} of its param group"


_RESIDUAL_ACCUMULATION = ("residual=True needs each step's whole gradient G, which per-layer updates with "
                          "micro_batches > 1 never hold; use micro_batches=1, or residual=False")


def galore_param_groups(model, rank, update_proj_gap=200, scale=0.25,
                        targets=("attn", "attention", "mlp", "feed_forward"), verbose=True):
    """Param groups in the official format: the 2-D weights of nn.Linear layers whose module name contains
    one of `targets` (attention and MLP matrices) are projected; everything else (embeddings, a tied or untied
    output head, norms, biases) is plain AdamW. Parameters carry their names, so errors can name them."""
    projected, projected_ids = [], set()
    for mod_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(t in mod_name for t in targets):
            projected.append((f"{mod_name}.weight", module.weight))
            projected_ids.add(id(module.weight))
    # named_parameters() lists a tied weight once, under its first name.
    other = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in projected_ids]
    if verbose:
        count = lambda ps: sum(p.numel() for _, p in ps)
        print(f"GaLore: {len(projected)} matrices ({count(projected):,} params) projected at rank {rank}, "
              f"{len(other)} tensors ({count(other):,} params) trained full-rank with AdamW")
    return [{"params": other},
            {"params": projected, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
             "proj_type": "std"}]


def attach_per_layer_updates(model, optimizer, micro_batches=1):
    """Per-layer weight updates (the class's section on them): each parameter is updated by step_param(p) from
    a backward hook, and its gradient freed. Every optimizer step: set each group's lr, then for each micro-batch
    `(model(x, y)[1] / micro_batches).backward()` (the last backward updates the weights), then optimizer.step(),
    which advances s. No global-norm clipping: it needs all gradients at once. A checkpoint taken before the last
    backward resumes exactly, by repeating the step; optimizer.zero_grad() forgets what was accumulated."""
    if micro_batches > 1 and any(g["residual"] and "rank" in g for g in optimizer.param_groups):
        raise ValueError(_RESIDUAL_ACCUMULATION)
    hook = lambda p: optimizer.step_param(p, micro_batches)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)


def optimizer_state_bytes(optimizer):
    """Bytes held in the optimizer state: moments M and V plus projectors P (what GaLore saves memory on)."""
    return sum(t.numel() * t.element_size()
               for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))


# NOTES ============================================================================================================
# Differences from the official galore_torch.GaLoreAdamW, and why:
#   * reset_on_update=True (default) zeroes M and V and restarts k at each refresh: moments measured in the old
#     subspace mean nothing in the new one. False keeps them (the official behaviour); at 10x the tokens that was
#     0.5% worse in final loss here, at the edge of the noise.
#   * proj_start_steps: an optional full-rank warmup (the official code has none). At plain lr (10x AdamW's on
#     the matrices) the loss rose during a 400-step warmup; at lr x alpha it falls, and ends 0.2% from no warmup.
#   * svd='subspace' (default) refreshes by one power step from the previous P: 12x cheaper than the SVD at
#     768 x 768, r = 256, and 28x at 2048 x 5461, r = 512, on a CPU; final loss within 0.2% of the exact SVD's.
#   * eps after the bias correction and weight decay before the update, as torch.optim.AdamW (the official code
#     adds eps before correcting and decays after stepping), so the unprojected path is AdamW to the last bit.
#   * the state holds tensors and ints only (the official code stores a projector object), so checkpoints load
#     with torch.load(weights_only=True) and move between devices.
#   * one side rule (right_side), the paper's 'std', instead of proj_type strings. The other side would store
#     fewer numbers (r max + 2 r min) with the same gradient energy, but Adam would normalize other coordinates;
#     unmeasured, so not offered.
# Fira's residual (residual=True) differs from Fira's reference code in two ways: S is the exact residual
# G - R P (Fira subtracts alpha R P, which leaves (1 - alpha) of the in-subspace part in S: 2.4% higher final
# loss at width/8, 0.4% at width/4, measured with bench.py's FiraAsPublished); and phi and the limiter use the
# bias-corrected N (Fira's code corrects after the limiter, which, with the moments reset at each refresh, would
# hold the residual down for a few dozen steps after every refresh). As in Fira, only P N is scaled by alpha: the
# residual steps at lr. Weight decay comes first here, as everywhere in this file.
# Measured figures (this project's docs/quality.md and docs/speed.md, bench.py):
#   * per-layer accumulation at 4 micro-batches ends 0.27% (exact SVD 0.24%) above the standard path; P from G_1
#     alone, with no sketch, cost 1.5%; zeroing the moments at P_next instead of projecting them, 0.7%.
#   * the batched step: 49 kernel launches per step at 125M instead of 1,106.
