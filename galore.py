"""
GaLore: Gradient Low-Rank Projection, as an AdamW that keeps its moments in a small subspace.

Paper: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
arXiv 2403.03507 (Algorithm 1 is what `GaLoreAdamW._update` implements).

This file depends on torch only: copy it into your project and use it like the official package,

    from galore import GaLoreAdamW, attach_per_layer_updates, galore_param_groups
    groups = galore_param_groups(model, rank=128, update_proj_gap=200, scale=0.25)
    opt = GaLoreAdamW(groups, lr=0.01)          # then opt.step() / opt.zero_grad() as usual
    attach_per_layer_updates(model, opt)        # optional: each weight updated inside backward, less memory

or with hand-made groups in the official format (a group with a 'rank' key is projected):

    opt = GaLoreAdamW([{'params': other},
                       {'params': matrices, 'rank': 128, 'update_proj_gap': 200,
                        'scale': 0.25, 'proj_type': 'std'}], lr=0.01)

Why it saves memory. AdamW keeps two moments per weight, so an m x n matrix costs 2mn extra numbers.
GaLore projects the gradient G (m x n) onto r directions, R = G P^T or P^T G, runs Adam on R, and maps the
Adam step back to m x n. The moments are then m x r (or r x n) and P is r x n (or m x r): the optimizer state
of the matrix shrinks from 2mn to 2 r max(m, n) + r min(m, n) numbers. The weights themselves stay full
rank: every refresh of P (every T steps) opens a new subspace, so the sum of many low-rank steps is not
low rank.
"""

import math

import torch
import torch.distributed as dist


class GaLoreAdamW(torch.optim.Optimizer):
    r"""AdamW whose moments live in a rank-r subspace of each projected matrix's gradient.

    The update of one projected parameter W (m x n) at optimizer step t (Algorithm 1 of the paper; the
    names are the paper's and the code's):

        G  = dL/dW                                      (m x n)     p.grad
        if t is a refresh step (see schedule below):
            U, S, Vh = svd(G)       (Vh: right singular vectors as rows; V is the second moment)  fp32, projector()
            P = Vh[:r]       (r x n)  if m >= n  ("right": R = G P^T)
            P = U[:, :r]     (m x r)  if m <  n  ("left":  R = P^T G)
            (after the first P the default svd="subspace" replaces the SVD by a power step: see below)
            M = V = 0, k = 0 if reset_on_update                     (k: the moments' age)
        R  = G P^T (m x r)   or   P^T G (r x n)                     project()
        k  = k + 1
        M  = beta1 M + (1 - beta1) R                                 first moment, low rank
        V  = beta2 V + (1 - beta2) R * R                             second moment, low rank
        N  = (M / (1 - beta1^k)) / (sqrt(V / (1 - beta2^k)) + eps)   normalized Adam step, low rank
        W  = W * (1 - lr * weight_decay)                             decoupled weight decay, full W
        W  = W - lr * alpha * (N P  or  P N)                         project back, scale by alpha

    A parameter in a group without 'rank' takes the same loop with P = identity and alpha = 1, which is
    exactly torch.optim.AdamW (same order of operations: decay first, eps added after bias correction).
    `_update` carries each statement of the paper's Algorithm 1 as a comment on the line that does it.

    Which side. The rule is the paper's 'std': P spans the smaller side, so M and V (the size of R) keep the
    larger one, 2 r max(m, n) + r min(m, n) numbers. Projecting the other way would store fewer, r max + 2 r min
    (2048 x 768 at r = 128: 458,752 instead of 622,592), and R would hold the same gradient energy (both sides'
    top-r singular vectors keep sigma_1..sigma_r), but Adam's elementwise normalization would act on other
    coordinates. We keep the paper's rule because its results were measured with it; the other is unmeasured.

    Schedule. One optimizer-level counter, s = number of steps already taken, decides for every matrix:
      * s < proj_start_steps: full-rank warmup, every parameter is plain AdamW (full-size moments), a matrix
        the group will project at lr x alpha: the step size it gets after the switch (at GaLore's lr, 10x
        AdamW's, plain lr on the matrices made the loss rise during a 400-step warmup; docs/quality.md);
      * s == proj_start_steps: the switch. Full-rank moments are freed, P is computed, low-rank moments start;
      * s == proj_start_steps + j * T (T = update_proj_gap): refresh P for all projected matrices at once.
    A matrix with r >= min(m, n) cannot be compressed and is trained full rank, like an unprojected one.

    How P is computed (svd=...). "subspace" (default): the first P from an exact SVD, every later one by one step
    of subspace (orthogonal) iteration started from the P it replaces,
        Y = G^T G P^T (n x r)  ->  P = orthonormal basis of Y's columns (QR), as rows      (mirrored if m < n)
    two matmuls and a thin QR instead of an SVD: 12x cheaper at 768 x 768, r = 256, and 28x at 2048 x 5461,
    r = 512, on a CPU. Repeated at every refresh this is the power method, so P follows the gradient's top-r
    subspace as it drifts; final loss within 0.2% of the exact SVD's (docs/speed.md). "full": the paper's
    exact SVD at every refresh. "randomized": torch.svd_lowrank, 2-5x cheaper, an approximate subspace.

    Batched (foreach). step() can run the same algorithm on stacks of same-shaped matrices: one matmul or one
    _foreach_* op per line of _update for the whole stack ("the batched step" below), 49 kernel launches per
    step at 125M instead of 1,106. The same numbers as _update, bit for bit on a CPU (tested). foreach=None
    (default) batches on CUDA, where launches cost, and loops elsewhere (on a CPU the stack copies cost more
    than they save); True or False forces either.

    Differences from the official galore_torch.GaLoreAdamW (deliberate, see README):
      * reset_on_update=True (default) zeroes M and V and restarts the bias correction at each refresh, since
        moments measured in the old subspace mean nothing in the new one; False keeps them (official).
      * proj_start_steps: optional full-rank warmup (the official code has none).
      * refreshes by subspace iteration from the previous P (svd="subspace", default); svd="full" is the paper's.
      * eps after bias correction and weight decay before the update, as torch.optim.AdamW (the official code
        adds eps before correcting and decays after stepping).
      * state holds tensors and ints only (the official code stores a projector object), so checkpoints load
        with torch.load(weights_only=True) and move between devices.
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
        if not (isinstance(proj_start_steps, int) and proj_start_steps >= 0):
            raise ValueError(f"Invalid proj_start_steps: {proj_start_steps} (must be an int >= 0)")
        if foreach not in (None, True, False):
            raise ValueError(f"Invalid foreach: {foreach!r} (True: the batched step, False: one matrix at a time, "
                             "None: batched on CUDA only)")
        self.proj_start_steps = proj_start_steps
        self.reset_on_update = reset_on_update
        self.foreach = foreach
        self.steps_taken = 0  # the optimizer-level counter s; saved in state_dict()
        # p -> (group position, index in group), for step_param(). Positions, not group dicts: load_state_dict()
        # replaces the dicts, and the hooks must read the LR the training loop sets on the current ones.
        self._where = {}
        # Per-layer updates with gradient accumulation (step_param): gradients seen per parameter in this step,
        # and each projected matrix's R summed so far. Not optimizer state: they are gradients.
        self._seen, self._pending, self._sketch = {}, {}, {}
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, svd=svd, residual=residual)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        # Called by Optimizer.__init__ for every group: validate GaLore groups once, here, never in step().
        if "rank" in param_group:
            g = param_group
            g.setdefault("update_proj_gap", 200)
            g.setdefault("scale", 0.25)
            g.setdefault("proj_type", "std")
            if not (isinstance(g["rank"], int) and g["rank"] > 0):
                raise ValueError(f"Invalid rank: {g['rank']} (must be an int > 0)")
            if not (isinstance(g["update_proj_gap"], int) and g["update_proj_gap"] > 0):
                raise ValueError(f"Invalid update_proj_gap: {g['update_proj_gap']} (must be an int > 0)")
            if not 0.0 < g["scale"]:
                raise ValueError(f"Invalid scale (alpha): {g['scale']} (must be a number > 0)")
            if g["proj_type"] != "std":
                raise ValueError(f"Unsupported proj_type: {g['proj_type']!r}. This implementation has only "
                                 "'std' (project on the smaller side of each matrix); use proj_type='std'")
        super().add_param_group(param_group)
        group = self.param_groups[-1]  # torch has now turned (name, tensor) pairs into params + param_names
        if group["svd"] not in ("full", "randomized", "subspace"):  # checked per group: a group may set its own
            raise ValueError(f"Invalid svd: {group['svd']!r} (use 'full', 'randomized' or 'subspace')")
        if group["residual"] not in (True, False):
            raise ValueError(f"Invalid residual: {group['residual']!r} (True or False)")
        for i, p in enumerate(group["params"]):
            self._where[p] = (len(self.param_groups) - 1, i)
        if "rank" in group:
            for i, p in enumerate(group["params"]):
                if p.dim() != 2:
                    raise ValueError(f"GaLore projects 2-D matrices only, but parameter {_name(group, i)} has "
                                     f"shape {tuple(p.shape)}: put it in a param group without 'rank'")

    # -- the optimizer-level step counter is part of the state, so a resumed run keeps its schedule --------
    def state_dict(self):
        state_dict = super().state_dict()
        state_dict["steps_taken"] = self.steps_taken
        return state_dict

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.steps_taken = state_dict.pop("steps_taken", 0)
        super().load_state_dict(state_dict)

    # -- projection: one rule from the shape ---------------------------------------------------------------
    # Each function takes one matrix (m, n) or a stack of them (L, m, n): the batched step calls the same code.
    @staticmethod
    def projector(G, rank, svd="full", P=None):
        """P for G (m x n): its top-`rank` right singular vectors as rows, r x n, if m >= n; else its top-`rank`
        left singular vectors as columns, m x r. P has orthonormal rows (or columns) and is in G's dtype.
        svd="randomized" approximates them with torch.svd_lowrank; svd="subspace" refines the previous P (one
        power step, see the class docstring), or takes an exact SVD when there is none. A staticmethod: call it
        on any matrix or stack, or override it on an instance to time or record the refreshes (bench.py, tests)."""
        right = G.shape[-2] >= G.shape[-1]
        # SVD in fp32 whatever the parameter dtype: bf16 SVD is not supported and would be too coarse anyway.
        if svd == "subspace" and P is not None:
            # Work on A = G (m >= n) or G^T, so that P's directions are A's right singular vectors, Q (n', r).
            A, Q = (G.float(), P.float().mT) if right else (G.float().mT, P.float())
            Q = GaLoreAdamW.orthonormal(A.mT @ (A @ Q))  # (n', r): one power step on A^T A from the old subspace
            P = Q.mT if right else Q            # (r, n) rows or (m, r) columns
        else:
            if svd == "randomized":
                # Randomized SVD (Halko et al. 2011): only the top `rank` triplets, from a few matmuls with a
                # random (n, rank) sketch and two power iterations; the subspace is approximate.
                U, S, V = torch.svd_lowrank(G.float(), q=rank, niter=2)  # U (m, r), V (n, r)
                Vh = V.mT
            else:
                U, S, Vh = torch.linalg.svd(G.float(), full_matrices=False)  # U (m, k), Vh (k, n), k = min(m, n)
            P = Vh[..., :rank, :] if right else U[..., :rank]
        # Always a copy, into storage of exactly P's size: on CUDA Vh comes back row-major, so Vh[:r] is a
        # contiguous view, and keeping it would keep all of Vh (k x n) alive, 3x P at 125M with fp32 weights.
        P = P.to(G.dtype, memory_format=torch.contiguous_format, copy=True)
        # Under data parallelism every rank holds the same all-reduced G, but an SVD is free to flip the sign of
        # a singular vector, and different ranks could pick differently (and a randomized SVD draws a different
        # sketch on each rank). Rank 0's P is the one everybody uses.
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(P, src=0)
        return P

    @staticmethod
    def orthonormal(Y):
        """An orthonormal basis of Y's columns (n', r), in order (Gram-Schmidt's, by QR), each on Y's side."""
        Q, Rq = torch.linalg.qr(Y)
        # QR fixes each column only up to sign (LAPACK's choice, not ours). diag(Rq) >= 0 puts column j on the
        # side of Y_j, which leans toward the old direction j (p_j . Y_j = |A p_j|^2 >= 0): on a gradient that
        # moved little P comes back nearly unchanged, so moments kept by reset_on_update=False stay meaningful.
        return Q * torch.where(Rq.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-2)

    @staticmethod
    def project(G, P):
        # right: (m, n) @ (n, r) -> R (m, r);  left: (r, m) @ (m, n) -> R (r, n)
        return G @ P.mT if G.shape[-2] >= G.shape[-1] else P.mT @ G

    @staticmethod
    def project_back(N, P, shape):
        # right: (m, r) @ (r, n) -> (m, n);   left: (m, r) @ (r, n) -> (m, n)
        return N @ P if shape[-2] >= shape[-1] else P @ N

    @staticmethod
    def compresses(p, group):
        """Whether p's group projects it once warmup is over (not if r >= min(m, n))."""
        return "rank" in group and group["rank"] < min(p.shape)

    def alpha(self, p, group):
        """The scale of p's update: alpha for a matrix its group compresses, during the full-rank warmup too."""
        return group["scale"] if self.compresses(p, group) else 1.0

    def is_projected(self, p, group):
        """Whether p is trained in a low-rank subspace at the current step (not during warmup, not if r >= min(m,n))."""
        return self.steps_taken >= self.proj_start_steps and self.compresses(p, group)

    # -- the update ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p in list(self._pending):  # per-layer: a matrix that got fewer gradients than asked
            g, i = self._where[p]
            self._finish(p, self.param_groups[g], i)
        self._seen.clear()
        self._pending.clear()
        for group in self.param_groups:
            # foreach=None: batched on CUDA, where launches cost; on a CPU the loop is faster (no stack copies).
            if self.foreach or self.foreach is None and any(p.is_cuda for p in group["params"]):
                self._batched_update(group)
                continue
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    self._update(p, group, i)
        # Parameters whose grad is None are skipped, like torch.optim.AdamW. This is also what makes per-layer
        # updates work: a backward hook calls step_param(p) and frees p.grad, and step() then only counts.
        self.steps_taken += 1
        return loss

    @torch.no_grad()
    def step_param(self, p, micro_batches=1):
        """Per-layer updates: called from a backward hook each time p's gradient of a micro-batch is complete.
        On the `micro_batches`-th call of this step, p is updated with the schedule of the step in progress and
        p.grad is freed. Before that, a projected matrix's gradient is projected at once, R_i = P^T G_i, added
        into a buffer of R's size (one moment's), and freed; an unprojected tensor keeps summing into p.grad.
        Projection is linear, so the sum of the R_i is P^T (G_1 + ... + G_N): the update of the accumulated
        gradient, which never exists in full. Call step() once after the last backward: it updates what is
        still pending (a parameter that got fewer gradients) and advances the counter.
        On a refresh step the accumulated G, which the refresh wants, is never held. So P comes in two parts:
          * for this step, from the first micro-batch's gradient G_1 (svd="subspace": one power step from the
            previous P on G_1), and every micro-batch, the first included, is projected onto it;
          * for the steps after, from all of them: each micro-batch also adds G_i^T (R_<i + R_<=i) into Y (n, r),
            R_<i the sum before it (mirrored, (m, r), for a wide matrix). Over the step Y = (sum_i G_i^T G_i +
            2 sum_j<i G_i^T G_j) P^T: each term of G^T G P^T, the power step on the accumulated G, in one pass.
            P_next = orth(Y) takes over at the next step, with the moments projected onto it (_take_P_next).
        Measured at 4 micro-batches against the standard path: 0.27% in final loss; P from G_1 alone cost 1.5%
        (docs/quality.md). P replaces the old P at once (and the reset frees the old moments then, not at the
        update): the matrix is marked as refreshed for this step, so that a run interrupted mid-accumulation,
        saved and resumed repeats the step on this P (Y is rebuilt; P_next, once made, is optimizer state)."""
        if p not in self._where:
            raise KeyError("step_param: this tensor is not a parameter of the optimizer")
        g, i = self._where[p]
        group = self.param_groups[g]
        self._seen[p] = self._seen.get(p, 0) + 1
        if self.is_projected(p, group):
            state = self.state[p]
            if p in self._pending:  # a later micro-batch: R += P^T G_i
                R_i = self.project(self._grad(p, group, i), state["P"])
                if p in self._sketch:  # Y += G_i^T (R_<i + R_<=i)
                    self._sketch[p].add_(self._sketch_term(p.grad, 2 * self._pending[p] + R_i))
                self._pending[p].add_(R_i)
            else:                   # this step's first: P refreshed if due, R = P^T G_1
                self._pending[p] = self._project(p, group, i)
                if micro_batches > 1 and state.get("refreshed_at") == self.steps_taken:  # Y = G_1^T R_1
                    self._sketch[p] = self._sketch_term(p.grad, self._pending[p])
            p.grad = None  # now in R
        if self._seen[p] == micro_batches:
            self._finish(p, group, i)

    @staticmethod
    def _sketch_term(G, S):
        # right (m >= n): G^T S (n, r) with S (m, r);  left: G S^T (m, r) with S (r, n). In fp32, as the SVD. Y is
        # P's size; the refresh step holds it where the moments its reset freed were (the 7B plan does not grow).
        return G.float().mT @ S.float() if G.shape[-2] >= G.shape[-1] else G.float() @ S.float().mT

    def _finish(self, p, group, i):
        """The update of a parameter at the end of its accumulation (step_param), and P_next from its Y."""
        Y = self._sketch.pop(p, None)
        if Y is not None:  # the subspace refresh's QR and sign rule, on the power step of the whole step's G
            Q = self.orthonormal(Y)
            self.state[p]["P_next"] = (Q.mT if p.shape[-2] >= p.shape[-1] else Q).to(p.dtype, copy=True)
        self._update(p, group, i, self._pending.pop(p, None))
        p.grad = None

    def zero_grad(self, set_to_none=True):
        # The R summed by step_param is a gradient too: forgotten with the others.
        self._seen.clear()
        self._pending.clear()
        self._sketch.clear()
        super().zero_grad(set_to_none)

    @staticmethod
    def _grad(p, group, i):
        if p.grad.is_sparse:
            raise RuntimeError(f"GaLoreAdamW does not support sparse gradients (parameter {_name(group, i)}); "
                               "use dense gradients, e.g. nn.Embedding(sparse=False)")
        return p.grad

    def _refresh_due(self, state, group):
        """(refresh P at this step, reset the moments with it) for a projected matrix with this state. A P_next
        waiting from the last step (per-layer accumulation, step_param) is put in place first: the new step's P."""
        if "P_next" in state:
            self._take_P_next(state, group)
        if state.get("refreshed_at") == self.steps_taken:  # already refreshed in this step (see _project)
            return False, False
        first = "P" not in state  # the switch (or this matrix missed it: it had no gradient then)
        refresh = first or (self.steps_taken - self.proj_start_steps) % group["update_proj_gap"] == 0
        return refresh, first or (refresh and self.reset_on_update)

    def _take_P_next(self, state, group):
        """P_next replaces P (per-layer accumulation, the step after a refresh; see step_param). With
        reset_on_update the moments are one step old, M = (1 - beta1) R and V = (1 - beta2) R^2 of the refresh
        step's R on the old P: they are projected onto the new P, R' = R P_old P^T (or P^T P_old R), as if that
        step had been taken on it with the part of G the old P saw. (Zeroed instead, the next update would be a
        second first step of Adam in a row at full lr: 0.7% worse in final loss, measured.) Without the reset the
        moments are kept, as at a refresh."""
        P_old, P = state["P"], state.pop("P_next")
        state["P"] = P
        if self.reset_on_update and state.get("step") == 1:
            beta1, beta2 = group["betas"]
            M = state["exp_avg"]
            right = P.shape[-2] < P.shape[-1]  # P (r, n): R = G P^T is (m, r); else P (m, r), R = P^T G (r, n)
            M_new = M.float() @ (P_old.float() @ P.float().mT) if right else (P.float().mT @ P_old.float()) @ M.float()
            M.copy_(M_new)                                                      # (1 - beta1) R'
            state["exp_avg_sq"].copy_(M_new.square_().mul_((1 - beta2) / (1 - beta1) ** 2))  # (1 - beta2) R'^2

    def _project(self, p, group, i):
        """R = P^T G for p's gradient at this step, P refreshed first if due; G itself for an unprojected tensor."""
        G = self._grad(p, group, i)  # (m, n) for a matrix; any shape else      Alg. 1: G_t = grad of phi_t(W_t)
        if not self.is_projected(p, group):
            return G  # P is the identity
        state = self.state[p]
        refresh, reset = self._refresh_due(state, group)
        if refresh:                                                             # Alg. 1: if t mod T = 0
            # Alg. 1: U, S, V = SVD(G_t); P_t = U[:, :r] (the paper writes the m <= n case); else P_t = P_t-1
            # (svd="subspace" passes the old P, and after the first refresh a power step from it replaces the SVD)
            state["P"] = self.projector(G, group["rank"], group["svd"], state.get("P"))  # (r, n) or (m, r)
            if reset:
                # Zeroing the moments alone would not do: Adam divides by (1 - beta^k) to undo their
                # zero start, and with k still large that correction is ~1. The first update would then
                # be (1-beta1) R / sqrt((1-beta2) R^2) = 0.1 / 0.032 ~ 3.2x the size of a normal Adam
                # step. Restarting k at 0 makes the first step after a reset an ordinary first Adam step.
                # At the switch this also frees the full-rank (m, n) moments of the warmup.
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    state.pop(key, None)
            # Done for this step, until _update: with accumulation (step_param) the update comes micro-batches
            # later, and a run cut short in between and resumed repeats the step on this P, not a new one.
            state["refreshed_at"] = self.steps_taken
        return self.project(G, state["P"])  # (m, r) or (r, n)                 Alg. 1: R_t = P_t^T G_t

    def _update(self, p, group, i, R=None):
        """One AdamW step of p; R: its projected gradient if already computed (summed over micro-batches by
        step_param), else projected here."""
        R = self._project(p, group, i) if R is None else R
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        state.pop("refreshed_at", None)
        projected = self.is_projected(p, group)
        alpha = self.alpha(p, group)  # 1 for a tensor the group never projects

        if "step" not in state:
            state["step"] = 0                                                   # k, the moments' age
            state["exp_avg"] = torch.zeros_like(R, memory_format=torch.preserve_format)     # M, shape of R
            state["exp_avg_sq"] = torch.zeros_like(R, memory_format=torch.preserve_format)  # V, shape of R
        M, V = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        k = state["step"]

        M.lerp_(R, 1 - beta1)                                  # Alg. 1: M_t = beta1 M_t-1 + (1 - beta1) R_t
        V.mul_(beta2).addcmul_(R, R, value=1 - beta2)          # Alg. 1: V_t = beta2 V_t-1 + (1 - beta2) R_t^2
        bias_correction1 = 1 - beta1 ** k                      # Alg. 1: M_t = M_t / (1 - beta1^t), applied below
        bias_correction2 = 1 - beta2 ** k                      # Alg. 1: V_t = V_t / (1 - beta2^t), applied here:
        denom = (V.sqrt() / math.sqrt(bias_correction2)).add_(eps)  # sqrt(V_hat) + eps

        if wd != 0:  # (multiplying by 1 would change no number, but costs a pass over W)
            p.mul_(1 - lr * wd)                                # decoupled weight decay on the full W
        if projected:
            N = M / denom / bias_correction1                   # Alg. 1: N_t = M_t / (sqrt(V_t) + eps), r-space
            if group["residual"]:
                U, state["residual_norm"] = self.residual_step(p.grad, R, N, state["P"], state.get("residual_norm"))
            else:
                U = self.project_back(N, state["P"], p.shape)
            # Alg. 1: G~_t = alpha P_t N_t; W_t = W_t-1 + eta G~_t (the paper's G_t is the negative gradient)
            p.add_(U, alpha=-lr * alpha)
        else:
            p.addcdiv_(M, denom, value=-lr * alpha / bias_correction1)  # plain AdamW at lr x alpha, as torch's

    @staticmethod
    def residual_step(G, R, N, P, last_norm, gamma=1.01):
        """P N plus the residual S = G - (R projected back), each row (right) or column (left) of S scaled by
        phi = ||N_row|| / ||R_row|| (Fira's norm-based scaling), its norm grown at most gamma x per step."""
        right = G.shape[-2] >= G.shape[-1]
        dim = -1 if right else -2  # along R's rank side: one phi per row of R (m, r), or column of R (r, n)
        norm = lambda X: torch.linalg.vector_norm(X, dim=dim, keepdim=True, dtype=torch.float32)
        G2, R2 = norm(G).square(), norm(R).square()  # (m, 1) or (1, n)
        phi = norm(N) / (R2.sqrt() + 1e-8)  # (m, 1) or (1, n)
        # ||S_row||^2 = ||G_row||^2 - ||R_row||^2, since R P is G's orthogonal projection (P orthonormal)
        S_norm = (phi.square() * (G2 - R2).clamp_(min=0)).sum((-2, -1), keepdim=True).sqrt_()  # ||phi S||
        if last_norm is not None:  # Fira's norm-growth limiter
            limiter = (S_norm / (last_norm.view(S_norm.shape) + 1e-8)).clamp_(min=gamma) / gamma
            phi, S_norm = phi / limiter, S_norm / limiter
        phi = phi.to(G.dtype)
        # P N + phi S = P (N - phi R) + phi G: one project_back, no (m, n) S
        U = GaLoreAdamW.project_back(N - phi * R, P, G.shape).addcmul_(G, phi)
        return U, S_norm.view(S_norm.shape[:-2])

    # -- the batched step: _update's lines, once per stack of same-shaped matrices ---------------------------
    # On a GPU every tensor operation is a kernel launch of 5-10 us, and _update makes 11 per matrix: 1,106
    # launches per step at 125M, more time than the arithmetic. Here the matrices of one group that share shape,
    # dtype, device and moments' age k are stacked, (L, m, n), and go through the lines of _update together:
    # one batched matmul projects, one _foreach_* op per moment line, one batched matmul projects back. That is
    # ~14 launches per stack (3 stacks at 125M) plus 7 for every unprojected tensor at once, AdamW's foreach.
    # The numbers are _update's: the same operations in the same order (bit for bit on a CPU, tested).
    max_stack_numel = 2 ** 26  # a stack's G and update are temporaries: at most 64M numbers (256 MB in fp32)

    def _batched_update(self, group):
        buckets = {}  # (projected, refresh, has P, k, shape, alpha, dtype, device) -> [params]
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            self._grad(p, group, i)  # dense, or a one-line error
            state, projected = self.state[p], self.is_projected(p, group)
            refresh, reset = self._refresh_due(state, group) if projected else (False, False)
            k = 0 if reset else state.get("step", 0)  # the moments' age once this step's reset is done
            key = (projected, refresh, "P" in state, k, tuple(p.shape) if projected else None,
                   self.alpha(p, group), p.dtype, p.device)  # (a warmup's matrices are at alpha, the rest at 1)
            buckets.setdefault(key, []).append(p)
        for (projected, refresh, has_P, k, shape, alpha, _, _), params in buckets.items():
            # Unprojected tensors are never stacked (foreach takes any shapes), so they go in one call, as in
            # torch.optim.AdamW(foreach=True); matrices in stacks of at most max_stack_numel numbers, as even as
            # possible (24 matrices that fit 20 at a time go 12 + 12, not 20 + 4).
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
                    if k == 0:  # reset (see _update)
                        for key in ("exp_avg", "exp_avg_sq", "step"):
                            st.pop(key, None)
            else:
                P = torch.stack([st["P"] for st in states])                    # (L, r, n) or (L, m, r)
            R = list(self.project(G, P))                                       # L x (m, r) or (r, n)
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
            update = self.project_back(torch.stack(N), P, params[0].shape)  # (L, m, n)
            torch._foreach_add_(params, list(update), alpha=-lr * alpha)
        else:
            torch._foreach_addcdiv_(params, M, denom, value=-lr * alpha / bias_correction1)


def _name(group, i):
    names = group.get("param_names")
    return repr(names[i]) if names else f"#{i} of its param group"


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
    """Per-layer weight updates (LOMO's, which the paper adopts for its memory figures): each parameter is
    updated by optimizer.step_param(p) as soon as its gradient is complete during backward, and the gradient is
    freed, so the model's full set of gradients never exists at once. With micro_batches = N > 1 (gradient
    accumulation) a parameter is updated during the N-th backward of the step; before that, a projected matrix
    keeps only R = P^T G summed over the micro-batches (one moment's size), an unprojected tensor its .grad.
    The loop, for every optimizer step:

        for group in optimizer.param_groups: group["lr"] = lr   # before the first backward of the step
        for micro in range(N):
            loss = model(x_micro, y_micro) / N; loss.backward() # the N-th backward updates the weights
        optimizer.step()                                        # advances the schedule (and updates a
                                                                # parameter that got fewer than N gradients)
    No global-norm clipping: it needs all gradients at once. The weights change only in the N-th backward, so
    an accumulation interrupted before it leaves the weights as the last step left them, and a checkpoint of
    weights and optimizer.state_dict() taken then resumes exactly (by repeating the step: on a refresh step the
    new P is in the state already, marked as this step's); optimizer.zero_grad() forgets what was accumulated."""
    hook = lambda p: optimizer.step_param(p, micro_batches)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)


def optimizer_state_bytes(optimizer):
    """Bytes held in the optimizer state: moments M and V plus projectors P (what GaLore saves memory on)."""
    return sum(t.numel() * t.element_size()
               for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
