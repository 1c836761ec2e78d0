"""
Memory and speed of AdamW vs GaLore (vs GaLore with per-layer updates, vs bf16 weights) on real training
steps of the Llama presets, with random tokens (no data needed).

    python bench.py --sizes tiny,60M                          # CPU: exact tensor bytes; a few minutes
    python bench.py --sizes 60M,125M,350M,1B --batch_size 1   # CUDA: adds peak memory and tokens/s
    python bench.py --svd                                     # one projector: full, randomized, subspace
    python bench.py --speed --sizes 125M                      # optimizer step, refresh, launches, tok/s
    python bench.py --speed --count_only --sizes 125M,1B,7B   # kernel launches per step (fake tensors)
    python bench.py --plan --sizes 125M,350M,1B,3B,7B         # planned peak memory (fake tensors, any machine)

Writes a table to stdout, --out JSON and a bar chart (--out with .png). On CUDA, peak memory is
torch.cuda.max_memory_allocated over the whole run. On CPU peak memory is not measured: the table gives the
exact bytes of weights, gradients held at once and optimizer state (their sum is a lower bound on a GPU's peak;
activations come on top).

--quality trains the `cpu` preset (3.25M parameters, 97% of them in the projected matrices) on byte-level
English text and compares the final validation loss of AdamW and GaLore (docs/quality.md):

    python bench.py --quality                                 # the 17-run sweep, ~58 min on 2 CPU cores
    python bench.py --quality --quality_runs pair             # AdamW lr 1e-3 vs GaLore r=64 lr 1e-2, 7 min
    python bench.py --quality --quality_runs refresh          # exact SVD vs subspace iteration, 3 pairs
    python bench.py --quality --quality_runs accum            # per-layer + 4 micro-batches vs standard + 4

The long horizon (10x the tokens; 8.65 MB of stdlib, torch, numpy and matplotlib docstrings): LONG_RUNS, shared by
two processes that write one JSON (~47 min per run with one thread each on this 2-core machine):

    OMP_NUM_THREADS=1 python bench.py --quality --quality_text packages --steps 4000 --eval_interval 200 \
        --quality_runs long --quality_part 0/2 --out quality_long.json     # and --quality_part 1/2 next to it

What bench.py takes from train.py, and why: get_args and DEFAULT_RANK (a benchmarked run is a train.py run, its
flags and ranks), get_lr (the quality runs follow train.py's schedule), plan_memory (--plan plans train.py's own
step) and save_atomic with WriteError (results are written as train.py writes its files). Everything else is here.

--plan runs train.py's memory planner (train.py --plan, memplan.py) for every size and plan variant below: the
real training steps on fake tensors, batch 1 x 1024 tokens. It writes a JSON record per (size, variant) and a
chart of the planned peak against model size, with the memory of common GPUs. On CUDA it also runs each plan
that fits on real tensors and records torch.cuda.max_memory_allocated next to it.
"""

import argparse
import ast
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import sysconfig
import time

from contextlib import nullcontext

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from data import DataError, folder_problem, get_batch, iter_windows, prepare
from galore import GaLoreAdamW, attach_per_layer_updates, galore_param_groups, optimizer_state_bytes, right_side
from llama import PRESETS, Llama, LlamaConfig
from train import (DEFAULT_RANK, WriteError, get_args, get_lr, plan_memory,  # what train.py runs: its flags,
                   save_atomic)  # schedule and planner; its atomic writer, whose errors are one line

VARIANTS = {  # name: (optimizer, per_layer, param dtype)
    "adamw": ("adamw", False, torch.float32),
    "galore": ("galore", False, torch.float32),
    "galore_pl": ("galore", True, torch.float32),
    "adamw_bf16": ("adamw", False, torch.bfloat16),
    "galore_bf16": ("galore", False, torch.bfloat16),
    "galore_pl_bf16": ("galore", True, torch.bfloat16),
}


PLAN_VARIANTS = {  # name: train.py flags
    "adamw": ["--optimizer", "adamw"],
    "adamw_bf16": ["--optimizer", "adamw", "--param_dtype", "bfloat16"],
    "adamw_bf16_ckpt": ["--optimizer", "adamw", "--param_dtype", "bfloat16", "--activation_checkpointing"],
    "galore": [],
    "galore_pl": ["--per_layer"],
    "galore_pl_bf16": ["--per_layer", "--param_dtype", "bfloat16"],
    "galore_pl_bf16_ckpt": ["--per_layer", "--param_dtype", "bfloat16", "--activation_checkpointing"],
    # the same, accumulating 64 micro-batches per optimizer step (65,536 tokens at batch 1 x 1024)
    "galore_pl_bf16_ckpt_acc64": ["--per_layer", "--param_dtype", "bfloat16", "--activation_checkpointing",
                                  "--grad_accum", "64"],
}
GPUS_GB = (8, 12, 16, 24)  # common laptop / desktop GPU memory sizes


def write_json(obj, path):
    def dump(obj, tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    write_result(obj, path, dump)


def save_figure(fig, path):
    write_result(fig, path, lambda fig, tmp: fig.savefig(tmp, format="png"))


def write_result(obj, path, write):
    """train.py's atomic writer (whole or not at all); a full disk or read-only folder ends bench.py in one line."""
    try:
        save_atomic(obj, path, write)
    except WriteError as e:
        raise SystemExit(f"bench.py: {e}. Free some space or choose another --out")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """Seconds that fn() takes, the GPU's queued work included; and what fn returned."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def bench_one(size, variant, args, device):
    opt_name, per_layer, pdtype = VARIANTS[variant]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = LlamaConfig(**{**PRESETS[size], "block_size": args.block_size,
                         "activation_checkpointing": args.activation_checkpointing})
    torch.manual_seed(0)
    model = Llama(cfg)
    for p in model.parameters():
        p.data = p.data.to(pdtype)
    model.to(device)
    rank = args.rank or DEFAULT_RANK[size]
    # Refresh every 3 steps here so the timed steps contain refreshes; the amortized figures use --gap.
    if opt_name == "galore":
        optimizer = GaLoreAdamW(galore_param_groups(model, rank, 3, 0.25, verbose=False), lr=1e-3,
                                svd=args.svd_method)
    elif per_layer:  # per-layer updates need step_param(); without 'rank' GaLoreAdamW is AdamW (tested)
        optimizer = GaLoreAdamW(model.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    grad_bytes = [0]
    if per_layer:
        # Registered before the update hook, so it sees each gradient before it is freed.
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(
                lambda p: grad_bytes.__setitem__(0, max(grad_bytes[0], p.grad.numel() * p.grad.element_size())))
        attach_per_layer_updates(model, optimizer)
    svd_s = [0.0]  # time inside projector computations (SVDs, power steps): the cost of the refreshes
    if opt_name == "galore":
        projector = optimizer.projector
        def timed_projector(G, r, svd, P=None):
            t, P = timed(lambda: projector(G, r, svd, P), device)
            svd_s[0] += t
            return P
        optimizer.projector = timed_projector  # an instance attribute: _update() calls this one
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and pdtype == torch.float32
           else torch.autocast("cpu", enabled=False))
    compiled = torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(0)
    step_t, opt_t, refresh = [], [], []
    for s in range(args.steps + 1):  # step 0 warms up (allocator, kernels) and is not timed
        x = torch.randint(0, 50257, (args.batch_size, args.block_size + 1), generator=g).to(device)
        sync(device)
        t0 = time.perf_counter()
        with ctx:
            _, loss = compiled(x[:, :-1], x[:, 1:])
        loss.backward()
        if not per_layer:
            grad_bytes[0] = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
        sync(device)
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        t2 = time.perf_counter()
        if s == 0:
            svd_s[0] = 0.0
        else:
            step_t.append(t2 - t0)
            opt_t.append(t2 - t1)
            refresh.append(opt_name == "galore" and s % 3 == 0)
    t_step = statistics.mean(t for t, r in zip(step_t, refresh) if not r)
    t_refresh = svd_s[0] / sum(refresh) if any(refresh) else 0.0  # all matrices' SVDs of one refresh
    t_opt = statistics.mean(t for t, r in zip(opt_t, refresh) if not r)
    tokens = args.batch_size * args.block_size
    return dict(
        size=size, variant=variant, rank=rank if opt_name == "galore" else None, params=model.num_params(),
        param_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6,
        grad_mb=grad_bytes[0] / 1e6, state_mb=optimizer_state_bytes(optimizer) / 1e6,
        peak_mb=torch.cuda.max_memory_allocated() / 1e6 if device.type == "cuda" else None,
        tokens_per_s=tokens / t_step, tokens_per_s_amortized=tokens / (t_step + t_refresh / args.gap),
        step_ms=1e3 * t_step, opt_step_ms=None if per_layer else 1e3 * t_opt,
        opt_step_amortized_ms=None if per_layer else 1e3 * (t_opt + t_refresh / args.gap),
        refresh_ms=1e3 * t_refresh)


class LaunchCounter(TorchDispatchMode):
    """Counts the operators that launch a GPU kernel: every aten operator but views (and _unsafe_view, a
    reshape), detach and reading a CPU scalar. A _foreach_* operator over many tensors counts once."""
    SKIP = ("aten.detach.", "aten._unsafe_view.", "aten._local_scalar_dense.", "aten.lift_fresh.")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.count += name.startswith("aten.") and not func.is_view and not name.startswith(self.SKIP)
        return func(*args, **(kwargs or {}))


SPEED_IMPLS = {  # name: (what, svd)
    "adamw": ("torch.optim.AdamW(foreach=True)", None),
    "galore_subspace": ("GaLoreAdamW, batched step, svd='subspace'", "subspace"),
    "galore_full": ("GaLoreAdamW, batched step, svd='full'", "full"),
    "galore_loop": ("GaLoreAdamW(foreach=False), one matrix at a time (the default on a CPU), svd='subspace'",
                    "subspace"),
    "galore_loop_full": ("GaLoreAdamW(foreach=False, svd='full'): as before the batched step and the subspace "
                         "refresh", "full"),
    "galore_residual": ("GaLoreAdamW(residual=True), batched step, svd='subspace': Fira's residual", "subspace"),
    "galore_loop_residual": ("GaLoreAdamW(foreach=False, residual=True), svd='subspace': Fira's residual, one "
                             "matrix at a time", "subspace"),
    "official": ("galore_torch.GaLoreAdamW 1.0 (the paper's code)", "full"),
}


def speed_optimizer(impl, model, rank, gap):
    if impl == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    groups = galore_param_groups(model, rank, gap, 0.25, verbose=False)
    if impl == "official":
        from galore_torch import GaLoreAdamW as Official  # optional: pip install galore-torch
        unnamed = [{**g, "params": [p for _, p in g["params"]]} for g in groups]  # it takes no (name, p) pairs
        return Official(unnamed, lr=1e-3, no_deprecation_warning=True)
    return GaLoreAdamW(groups, lr=1e-3, svd=SPEED_IMPLS[impl][1], foreach=not impl.startswith("galore_loop"),
                       residual=impl.endswith("_residual"))


def count_launches(size, impl, rank, gap):
    """Kernel-launching operators of one plain optimizer step (the one after the first), on fake tensors: no
    memory, nothing computed, so any size can be counted on any machine."""
    with FakeTensorMode():
        model = Llama(LlamaConfig(**PRESETS[size]))
        optimizer = speed_optimizer(impl, model, rank, gap)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()  # states and projectors created
        counter = LaunchCounter()
        with counter:
            optimizer.step()
    return counter.count


def set_refresh_due(optimizer, impl, gap):
    """Make the next step a projector refresh (for every matrix at once)."""
    if impl.startswith("galore"):
        optimizer.steps_taken = gap * math.ceil(optimizer.steps_taken / gap)
    elif impl == "official":  # it refreshes a matrix when its own step count is a multiple of T
        for group in optimizer.param_groups:
            for p in group["params"]:
                if "rank" in group:
                    optimizer.state[p]["step"] = gap * math.ceil(optimizer.state[p]["step"] / gap)


def speed_one(size, impl, args, device):
    """ms per plain optimizer step and per refresh (the refresh step's time less a plain step's), and tok/s of
    whole training steps (forward, backward, step) with the refresh amortized over T = args.gap."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**{**PRESETS[size], "block_size": args.block_size})).to(device)
    rank = args.rank or DEFAULT_RANK[size]
    optimizer = speed_optimizer(impl, model, rank, args.gap)
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
    compiled = torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(0)
    seconds = lambda fn: timed(fn, device)[0]

    def forward_backward():
        x = torch.randint(0, 50257, (args.batch_size, args.block_size + 1), generator=g).to(device)
        with ctx:
            _, loss = compiled(x[:, :-1], x[:, 1:])
        loss.backward()

    forward_backward()
    optimizer.step()  # states and first projectors created (not timed), then a warm-up plain step
    optimizer.step()
    plain = statistics.median(seconds(optimizer.step) for _ in range(args.steps))
    refresh = []
    for _ in range(2 if device.type == "cpu" else 3):
        set_refresh_due(optimizer, impl, args.gap)
        refresh.append(seconds(optimizer.step) - plain if impl != "adamw" else 0.0)
    optimizer.zero_grad(set_to_none=True)
    whole = statistics.median(seconds(lambda: (forward_backward(), optimizer.step(),
                                               optimizer.zero_grad(set_to_none=True))) for _ in range(args.steps))
    tokens = args.batch_size * args.block_size
    return dict(size=size, impl=impl, what=SPEED_IMPLS[impl][0], rank=None if impl == "adamw" else rank,
                launches=count_launches(size, impl, rank, args.gap), opt_step_ms=1e3 * plain,
                refresh_ms=1e3 * statistics.median(refresh), step_ms=1e3 * whole, tokens_per_s=tokens / whole,
                tokens_per_s_amortized=tokens / (whole + statistics.median(refresh) / args.gap))


def speed_bench(args, device, device_name):
    impls = [i for i in args.variants.split(",") if i != "official" or importlib.util.find_spec("galore_torch")]
    if not args.count_only:
        print(f"{device_name}, batch {args.batch_size} x {args.block_size} tokens, refresh amortized over "
              f"T = {args.gap}")
    print(f"{'size':>5} {'optimizer':>16} {'launches':>8}" + ("" if args.count_only else
          f" {'opt step ms':>11} {'refresh ms':>10} {'tok/s':>8} {'tok/s T':>8} {'vs adamw':>8}"))
    rows = []
    for size in args.sizes.split(","):
        for impl in impls:
            if args.count_only:  # no real tensors: any size on any machine
                rank = args.rank or DEFAULT_RANK[size]
                r = dict(size=size, impl=impl, rank=rank, launches=count_launches(size, impl, rank, args.gap))
                rows.append(r)
                print(f"{size:>5} {impl:>16} {r['launches']:8d}", flush=True)
                continue
            r = speed_one(size, impl, args, device)
            base = next((b for b in rows if b["size"] == size and b["impl"] == "adamw"), None)
            r["vs_adamw"] = r["tokens_per_s_amortized"] / base["tokens_per_s"] if base else None
            rows.append(r)
            print(f"{size:>5} {impl:>16} {r['launches']:8d} {r['opt_step_ms']:11.1f} {r['refresh_ms']:10.1f} "
                  f"{r['tokens_per_s']:8.0f} {r['tokens_per_s_amortized']:8.0f} "
                  + (f"{r['vs_adamw']:7.2f}x" if r["vs_adamw"] else "       -"), flush=True)
    return rows


def svd_bench(args, device):
    """Time one projector computation: the exact SVD, the randomized one (torch.svd_lowrank) and one step of
    subspace iteration from the previous P, and how much of the gradient's energy each subspace keeps relative
    to the exact top-r one."""
    rows = []
    for (m, n), r in [((768, 768), 256), ((2048, 768), 256), ((2048, 2048), 512), ((2048, 5461), 512)]:
        g = torch.Generator().manual_seed(0)
        # A gradient-like matrix: a decaying spectrum (sigma_i ~ 1/i) plus noise. Pure Gaussian noise has a
        # flat spectrum, the worst case for a randomized SVD and nothing like a real gradient.
        k = min(m, n)
        def spectrum_matrix():
            U = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
            V = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
            return (U / torch.arange(1, k + 1)) @ V.T + 1e-3 * torch.randn(m, n, generator=g)
        G = spectrum_matrix().to(device)
        # The previous refresh's gradient: G plus as much again of a matrix with other singular vectors, so the
        # previous P is far from G's own (a hard case for a warm start; a real gradient drifts less in T steps).
        P_prev = GaLoreAdamW.projector(G + spectrum_matrix().to(device), r, "full")
        timings, Ps = {}, {}
        for name, P_start in (("full", None), ("randomized", None), ("subspace", P_prev)):
            fn = lambda: GaLoreAdamW.projector(G, r, name, P_start)
            fn()  # warm-up
            runs = [timed(fn, device) for _ in range(args.svd_repeats)]
            timings[name], Ps[name] = statistics.median(t for t, _ in runs), runs[-1][1]
        energy = lambda P: GaLoreAdamW.project(G, P).norm() ** 2  # |R|^2: the gradient the subspace keeps
        exact = energy(Ps["full"])
        row = dict(shape=f"{m}x{n}", rank=r, full_ms=1e3 * timings["full"])
        for name in ("randomized", "subspace"):
            row.update({f"{name}_ms": 1e3 * timings[name], f"{name}_speedup": timings["full"] / timings[name],
                        f"{name}_energy": (energy(Ps[name]) / exact).item()})
        row["previous_energy"] = (energy(P_prev) / exact).item()  # what the warm start began from
        rows.append(row)
        print(f"{m:>5}x{n:<5} r={r:<4} full SVD {row['full_ms']:8.1f} ms | randomized {row['randomized_ms']:7.1f} ms "
              f"{row['randomized_speedup']:5.1f}x energy {row['randomized_energy']:.4f} | subspace "
              f"{row['subspace_ms']:7.1f} ms {row['subspace_speedup']:5.1f}x energy {row['subspace_energy']:.4f} "
              f"(previous P {row['previous_energy']:.4f})", flush=True)
    return rows


def plan_sweep(args, device):
    """Planned peak of every (size, variant); on CUDA also the measured peak of those that fit."""
    rows = []
    print(f"{'size':>5} {'variant':>20} {'rank':>5} {'peak GB':>8} {'weights':>8} {'grads':>6} {'state':>6} "
          f"{'activ.':>6} {'temp.':>6} {'plan s':>6}" + (f" {'CUDA max alloc':>14}" if device.type == "cuda" else "")
          + "  peak during")
    for size in args.sizes.split(","):
        for variant in args.variants.split(","):
            flags = ["--size", size, "--batch_size", str(args.batch_size), "--block_size", str(args.block_size),
                     "--svd", args.svd_method,
                     *(["--rank", str(args.rank)] if args.rank else []), *PLAN_VARIANTS[variant]]
            t0 = time.perf_counter()
            plan = plan_memory(get_args(flags), "cuda")
            row = dict(variant=variant, flags=" ".join(flags), plan_s=time.perf_counter() - t0, **plan)
            if device.type == "cuda":  # the same steps on real tensors, if they can fit
                row["cuda_max_allocated"] = row["real_tracked_bytes"] = None
                gc.collect()  # the last variant's model and optimizer
                torch.cuda.empty_cache()
                if plan["peak_bytes"] < 0.9 * torch.cuda.mem_get_info(device)[0]:
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    real = plan_memory(get_args(flags), "cuda", fake=False)
                    row["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device) - base
                    row["cuda_max_reserved"] = torch.cuda.max_memory_reserved(device)
                    row["real_tracked_bytes"] = real["peak_bytes"]
            rows.append(row)
            b = {k: v / 1e9 for k, v in plan["bytes"].items()}
            measured = f" {row['cuda_max_allocated'] / 1e9 if row.get('cuda_max_allocated') else float('nan'):14.2f}"
            print(f"{size:>5} {variant:>20} {str(plan['rank'] or '-'):>5} {plan['peak_bytes'] / 1e9:8.2f} "
                  f"{b['weights']:8.2f} {b['gradients']:6.2f} {b['optimizer state']:6.2f} {b['activations']:6.2f} "
                  f"{b['temporaries']:6.2f} {row['plan_s']:6.1f}" + (measured if device.type == "cuda" else "")
                  + f"  {plan['peak_phase']}", flush=True)
    return rows


def plan_chart(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((r["params"] / 1e9, r["peak_bytes"] / 1e9) for r in rows if r["variant"] == variant)
        ax.plot(*zip(*pts), marker="o", label=variant)
    for gb in GPUS_GB:
        ax.axhline(gb, color="gray", lw=0.8, ls="--")
        ax.text(min(r["params"] for r in rows) / 1e9, gb, f" {gb} GB GPU", va="bottom", fontsize=8, color="gray")
    ax.set(xscale="log", yscale="log", xlabel="model (parameters)", ylabel="planned peak (GB of tensors)",
           title="What fits where: simulated peak memory, "
                 f"batch {rows[0]['batch_size']} x {rows[0]['block_size']} tokens")
    sizes = {r["size"]: r["params"] / 1e9 for r in rows}
    ax.set_xticks(list(sizes.values()), [f"{s}\n{p:.2f}B" for s, p in sizes.items()], minor=False)
    ax.set_xticks([], minor=True)
    ticks = [1, 2, 4, 8, 12, 16, 24, 32, 64, 128]
    ax.set_yticks(ticks, [str(t) for t in ticks], minor=False)
    ax.set_yticks([], minor=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def chart(results, path, device_name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = list(dict.fromkeys(r["size"] for r in results))
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 4.5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        rs = [r for r in results if r["size"] == size]
        names = [r["variant"] for r in rs]
        bottom = [0.0] * len(rs)
        for key, label in (("param_mb", "weights"), ("grad_mb", "grads held at once"), ("state_mb", "optimizer state")):
            vals = [r[key] / 1e3 for r in rs]
            ax.bar(names, vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
        if rs[0]["peak_mb"] is not None:
            ax.scatter(names, [r["peak_mb"] / 1e3 for r in rs], color="k", marker="_", s=400, label="peak (measured)")
        ax.set_title(f"{size} ({device_name})")
        ax.set_ylabel("GB")
        ax.tick_params(axis="x", rotation=45)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# --- Quality: AdamW vs GaLore at equal tokens, on byte-level text, on a CPU -----------------------------------

QUALITY_TEXTS = {  # name: the installed packages whose docstrings follow the standard library's
    "stdlib": (),
    # ~8.5 MB: 10x the tokens of the stdlib setting in about one epoch. All three are pinned in requirements.txt, so
    # the text is the same on every machine with the same Python; licences: torch and numpy BSD-3, matplotlib's
    # own (PSF-based), the standard library's PSF.
    "packages": ("torch", "numpy", "matplotlib"),
}


def docstring_text(path, packages=()):
    """English prose that any machine can rebuild offline and that may be redistributed: the docstrings longer
    than 200 characters of the installed CPython's standard library (PSF license; tests, IDLE and lib2to3 left
    out), then those of `packages` (their tests left out), in a fixed order. Python 3.11.7 gives 2,202 stdlib
    docstrings, 1.21 MB of UTF-8."""
    roots = [(sysconfig.get_paths()["stdlib"], ("test", "tests", "idlelib", "lib2to3", "site-packages",
                                                 "dist-packages", "__pycache__"))]
    roots += [(os.path.dirname(importlib.util.find_spec(p).origin), ("test", "tests", "testing", "__pycache__"))
              for p in packages]
    docs = []
    for root, skip in roots:
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in skip)
            for name in sorted(f for f in files if f.endswith(".py")):
                try:
                    with open(os.path.join(folder, name), encoding="utf-8") as f:
                        tree = ast.parse(f.read())
                except (SyntaxError, UnicodeDecodeError, ValueError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        doc = ast.get_docstring(node)
                        if doc and len(doc) > 200:
                            docs.append(doc)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(docs))
    return len(docs)


def run_config(optimizer, lr, alpha, rank=None, gap=200, reset=True, svd="full", proj_start=0, other_scale=1.0,
               seed=0, accum=1, per_layer=False, clip=1.0, residual=False):
    """One quality run's settings, with None where its optimizer has no use for one: the record's key.
    alpha: GaLore's scale (the control's factor on the matrices' lr); proj_start: GaLoreAdamW's proj_start_steps
    (full-rank warmup); other_scale: the unprojected tensors' lr is lr x other_scale; seed: init and batch order;
    accum: micro-batches per step (the batch split, the same tokens); per_layer: GaLore's per-layer updates;
    clip: the global grad-norm clip (0 = none; per-layer updates cannot clip); residual: GaLoreAdamW(residual=True),
    'fira' for FiraAsPublished, 'scaled' for ScaledResidual."""
    g = optimizer == "galore"
    return dict(optimizer=optimizer, lr=lr, rank=rank if g else None, gap=gap if g else None,
                reset=reset if g else None, svd=svd if g else None, alpha=alpha if optimizer != "adamw" else None,
                proj_start=proj_start if g else None, other_scale=other_scale if g else None, seed=seed,
                accum=accum, per_layer=per_layer if g else None, clip=clip, residual=residual if g else None)


def run_key(r, alpha):
    """The settings of record r as a tuple; records written before a setting existed had its default."""
    given = {k: r[k] for k in ("rank", "gap", "reset", "svd", "proj_start", "other_scale", "seed", "accum",
                               "per_layer", "clip", "residual") if r.get(k) is not None}
    return tuple(run_config(r["optimizer"], r["lr"], r.get("alpha", alpha), **given).values())


class FiraAsPublished(GaLoreAdamW):
    """GaLoreAdamW(residual=True) with the update of Fira's reference code, to compare the two (bench.py
    --quality, run_config(residual='fira')): per step
        W -= lr * (alpha N P + phi (G - alpha R P))      (GaLoreAdamW: W -= lr * (alpha N P + phi (G - R P)))
    so its "residual" keeps (1 - alpha) of G's part inside the subspace. phi and the 1.01x limiter (on this
    residual's norm) come from the bias-corrected N, as in GaLoreAdamW (Fira's code corrects after the limiter:
    galore.py's NOTES)."""

    def residual_step(self, G, R, N, P, alpha, last_norm, gamma=1.01):
        """What _update steps by lr x alpha: (N - phi R) P + (phi / alpha) G; and ||phi (G - alpha R P)||."""
        dim = -1 if right_side(G.shape) else -2
        acc = torch.float64 if G.dtype == torch.float64 else torch.float32
        norm = lambda X: torch.linalg.vector_norm(X, dim=dim, keepdim=True, dtype=acc)
        G2, R2 = norm(G).square(), norm(R).square()
        phi = norm(N) / (R2.sqrt() + 1e-8)
        # ||G_i - a R_i P||^2 = ||G_i||^2 - 2a ||R_i||^2 + a^2 ||R_i||^2, since G_i P^T = R_i and P P^T = I
        a = alpha
        S_norm = (phi.square() * (G2 - (2 * a - a * a) * R2).clamp_(min=0)).sum((-2, -1), keepdim=True).sqrt_()
        if last_norm is not None:
            limiter = (S_norm / (last_norm.view(S_norm.shape) + 1e-8)).clamp_(min=gamma) / gamma
            phi, S_norm = phi / limiter, S_norm / limiter
        phi = phi.to(G.dtype)
        update = GaLoreAdamW.project_back(N - phi * R, P, G.shape).addcmul_(G, phi / a)
        return update, S_norm.view(S_norm.shape[:-2]).to(G.dtype)


class ScaledResidual(GaLoreAdamW):
    """The exact residual S = G - R P, as GaLoreAdamW's, but stepped at lr x alpha like P N:
    W -= lr * alpha * (N P + phi S) (run_config(residual='scaled')), i.e. GaLoreAdamW's residual_step with alpha 1.
    galore.py shipped this form first; the long runs put it behind (docs/quality.md), and it stays here to compare."""

    def residual_step(self, G, R, N, P, alpha, last_norm, gamma=1.01):
        return GaLoreAdamW.residual_step(G, R, N, P, 1.0, last_norm, gamma)


def quality_run(data_dir, vocab_size, args, cfg):
    """Train the `cpu` preset for args.steps steps as train.py does (same init seed, same batches from the
    same generator, warmup 10% then cosine to 10%, grad clip 1.0, fp32) and return its val loss curve.
    cfg (run_config): optimizer 'adamw'; 'adamw_galore_lrs' = AdamW with GaLore's per-group lrs (matrices at
    lr x alpha), the control that separates the projection from GaLore's smaller steps on the matrices; 'galore'."""
    torch.manual_seed(cfg["seed"])
    model = Llama(LlamaConfig(**{**PRESETS["cpu"], "vocab_size": vocab_size, "block_size": args.block_size}))
    other, matrices = galore_param_groups(model, cfg["rank"] or 1, cfg["gap"] or 200, cfg["alpha"] or 1.0,
                                          verbose=False)
    if cfg["optimizer"] == "galore":
        optimizer = {"fira": FiraAsPublished, "scaled": ScaledResidual}.get(cfg["residual"], GaLoreAdamW)
        opt = optimizer([{**other, "lr_scale": cfg["other_scale"]}, matrices], lr=cfg["lr"],
                        proj_start_steps=cfg["proj_start"], reset_on_update=cfg["reset"], svd=cfg["svd"],
                        residual=bool(cfg["residual"]))
        if cfg["per_layer"]:
            attach_per_layer_updates(model, opt, cfg["accum"])
    elif cfg["optimizer"] == "adamw_galore_lrs":
        opt = torch.optim.AdamW([other, {"params": matrices["params"], "lr_scale": cfg["alpha"]}], lr=cfg["lr"])
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    gen, curve, t0 = torch.Generator().manual_seed(1337 + cfg["seed"]), [], time.perf_counter()

    @torch.no_grad()
    def val_loss(whole=False):
        model.eval()
        if whole:  # every window of the val split once, weighted by its rows
            losses = [(model(x, y)[1].item(), len(x)) for x, y in iter_windows(data_dir, "val", 32, args.block_size)]
        else:      # a fixed slice, the same at every eval
            g = torch.Generator().manual_seed(1234)
            losses = [(model(*get_batch(data_dir, "val", args.batch_size, args.block_size, generator=g))[1].item(), 1)
                      for _ in range(args.eval_iters)]
        model.train()
        return sum(l * n for l, n in losses) / sum(n for _, n in losses)

    for it in range(args.steps):
        if it % args.eval_interval == 0:
            curve.append((it, val_loss()))
        lr_t = get_lr(it, cfg["lr"], 0.1 * cfg["lr"], args.steps // 10, args.steps)
        for group in opt.param_groups:
            group["lr"] = lr_t * group.get("lr_scale", 1.0)
        for _ in range(cfg["accum"]):  # the batch in accum micro-batches, the loss of each / accum, as train.py
            x, y = get_batch(data_dir, "train", args.batch_size // cfg["accum"], args.block_size, generator=gen)
            _, loss = model(x, y)
            (loss / cfg["accum"]).backward()
        if cfg["clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            break  # diverged: recorded with its curve so far and an infinite final loss
    curve.append((it + 1, val_loss()))
    final = val_loss(whole=True) if math.isfinite(curve[-1][1]) else float("inf")
    return dict(cfg, final_val_loss=final, curve=curve, state_bytes=optimizer_state_bytes(opt),
                seconds=time.perf_counter() - t0)


LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # learning rates the quality sweep may try


def tune(run, lrs):
    """The best of run(lr) for lr in lrs (run returns a record with 'lr' and 'final_val_loss'), after widening
    the grid one LADDER step at a time until both neighbours of the best are measured: a best lr at the edge of
    its grid says only that a better one may lie beyond. Stops at the ends of LADDER."""
    rs = {lr: run(lr) for lr in lrs}
    while True:
        best = min(rs.values(), key=lambda r: r["final_val_loss"])
        i = LADDER.index(best["lr"])
        more = [LADDER[j] for j in (i - 1, i + 1) if 0 <= j < len(LADDER) and LADDER[j] not in rs]
        if not more:
            return best
        rs.update({lr: run(lr) for lr in more})


# The long-horizon runs (--quality_runs long), in the order they were wanted (a sweep skips what its JSON holds):
# the lr brackets of AdamW, the per-group control and GaLore at rank width/4, one change at a time from GaLore's
# defaults (lr 1e-2, T 200, reset, exact SVD, alpha 0.25, no warmup, unprojected tensors at lr), a second seed of
# the pair, the control's bracket below its 1e-2, the rest of the changes, the baseline's second seed, and rank 96
# between the two ranks that bracket the baseline (64 behind it, 128 ahead).
LONG_RUNS = (
    ("adamw", 3e-3, {}), ("adamw", 3e-4, {}), ("adamw_galore_lrs", 1e-2, {}), ("galore", 3e-2, {}),
    ("galore", 3e-3, {}), ("galore", 1e-2, {"other_scale": 0.1}), ("galore", 1e-2, {"svd": "subspace"}),
    ("galore", 1e-2, {"rank": 128}), ("galore", 1e-2, {"rank": 32}), ("galore", 1e-2, {"gap": 50}),
    ("adamw", 1e-3, {"seed": 1}), ("galore", 1e-2, {"seed": 1}),
    ("adamw_galore_lrs", 3e-3, {}), ("adamw_galore_lrs", 1e-3, {}),  # the control's bracket below its 1e-2
    ("galore", 1e-2, {"alpha": 0.5}), ("galore", 1e-2, {"reset": False}),
    ("galore", 1e-2, {"gap": 500}), ("galore", 1e-2, {"proj_start": 400}),
    ("adamw_galore_lrs", 3e-3, {"seed": 1}),  # the baseline's own seed noise
    ("galore", 1e-2, {"rank": 96}),
    # GaLore + the residual (Fira's norm-scaled residual, issue 37) at ranks width/4 and width/8: first as
    # ScaledResidual (galore.py's first form: the residual at lr x alpha), lrs bracketed
    ("galore", 1e-2, {"residual": "scaled"}), ("galore", 1e-2, {"rank": 32, "residual": "scaled"}),
    ("galore", 3e-3, {"residual": "scaled"}), ("galore", 3e-3, {"rank": 32, "residual": "scaled"}),
    ("galore", 3e-2, {"residual": "scaled"}), ("galore", 3e-2, {"rank": 32, "residual": "scaled"}),
    # ... as Fira's reference code forms it (FiraAsPublished), at the lr of Fira's own scripts
    ("galore", 1e-2, {"residual": "fira"}), ("galore", 1e-2, {"rank": 32, "residual": "fira"}),
    # ... and as galore.py's residual=True forms it (the exact S, at lr: not lr x alpha)
    ("galore", 1e-2, {"residual": True}), ("galore", 1e-2, {"rank": 32, "residual": True}),
    ("galore", 3e-3, {"residual": True}),
    ("galore", 1e-3, {"residual": True}), ("galore", 3e-3, {"rank": 32, "residual": True}),
    # not yet run: the brackets still open (rank 32 above its 1e-2; Fira's update, run at 1e-2 only)
    ("galore", 3e-2, {"rank": 32, "residual": True}), ("galore", 3e-3, {"residual": "fira"}),
)


def describe(r, alpha):
    """A run's settings in a few words: the optimizer and lr, then what differs from the defaults."""
    text = f"{r['optimizer']} lr {r['lr']:g}" + (f" r={r['rank']}" if r.get("rank") else "")
    defaults = run_config("galore", 1.0, alpha, rank=r.get("rank"))
    for k in ("gap", "reset", "svd", "alpha", "proj_start", "other_scale", "per_layer", "residual"):
        if r["optimizer"] == "galore" and r.get(k, defaults[k]) != defaults[k]:
            text += f" {dict(gap='T', proj_start='warmup', other_scale='other lr x').get(k, k)}={r[k]}"
    text += f" accum={r['accum']}" if r.get("accum", 1) != 1 else ""
    text += f" clip={r['clip']}" if r.get("clip", 1.0) != 1.0 else ""
    return text + (f" seed {r['seed']}" if r.get("seed") else "")


def print_ratios(runs, alpha):
    """Each run's final val loss against the baseline: the best AdamW of seed 0, the per-group control included."""
    finite = [r for r in runs if math.isfinite(r["final_val_loss"])]
    adamws = [r for r in finite if r["optimizer"] != "galore" and not r.get("seed")]
    if not adamws:
        return
    base = min(adamws, key=lambda r: r["final_val_loss"])
    print(f"baseline: {describe(base, alpha)}, final val loss {base['final_val_loss']:.4f}")
    for r in sorted(runs, key=lambda r: r["final_val_loss"]):
        ratio = r["final_val_loss"] / base["final_val_loss"]
        print(f"{describe(r, alpha):>60} | {r['final_val_loss']:.4f} | / baseline {ratio:.4f}")


def quality_sweep(args, out):
    """The sweep of docs/quality.md; the JSON is rewritten after every run."""
    name = "stdlib_docstrings" if args.quality_text == "stdlib" else f"{args.quality_text}_docstrings"
    text = os.path.join("data", f"{name}.txt")
    if msg := folder_problem("data", "the text's folder"):  # it is built in the current folder
        raise SystemExit(f"bench.py: {msg} (run bench.py from a folder you can write)")
    os.makedirs("data", exist_ok=True)
    try:
        n_docs = docstring_text(text, QUALITY_TEXTS[args.quality_text])
    except OSError as e:  # a full disk: the partial text is removed (it is rebuilt at every start anyway)
        if os.path.exists(text):
            os.remove(text)
        raise SystemExit(f"bench.py: could not write {text} ({e.strerror or e}); nothing is kept. Free some space")
    data_dir = os.path.join("data", f"{name}_bytes")
    try:
        meta = prepare(data_dir, [text], "bytes")
    except DataError:  # e.g. built from another Python's docstrings: this folder is bench.py's own, rebuilt
        shutil.rmtree(data_dir)
        meta = prepare(data_dir, [text], "bytes")
    vocab = 64 * math.ceil(meta["vocab_size"] / 64)  # 257 -> 320, as train.py pads it
    width = PRESETS["cpu"]["dim"]
    pkgs = "".join(f", {p} {importlib.metadata.version(p)}" for p in QUALITY_TEXTS[args.quality_text])
    described = f"{n_docs} stdlib docstrings" if not pkgs else f"{n_docs} docstrings (stdlib{pkgs})"
    header = dict(python=platform.python_version(), torch=torch.__version__, text=described,
                  train_tokens=meta["train_tokens"], val_tokens=meta["val_tokens"], steps=args.steps,
                  batch_size=args.batch_size, block_size=args.block_size, tokens=args.steps * args.batch_size
                  * args.block_size, alpha=args.alpha, model="cpu", params=None, runs=[])
    header["params"] = Llama(LlamaConfig(**{**PRESETS["cpu"], "vocab_size": vocab})).num_params()
    runs = header["runs"]
    key = lambda r: run_key(r, args.alpha)

    def saved():  # the runs in `out` with the same setup, by key (none if it is missing or of another setup)
        if not os.path.exists(out):
            return {}
        with open(out) as f:
            old = json.load(f)
        same = all(old.get(k) == header[k] for k in header if k != "runs")
        return {key(r): r for r in old["runs"]} if same else {}

    # Runs already in `out` are reused, so an interrupted sweep goes on where it stopped. What is written: this
    # invocation's runs, then the others in `out`, read again at each write, so that two processes given the
    # same --out and different --quality_part write one file without losing each other's runs.
    done = saved()
    result = lambda: dict(header, runs=runs + [r for k, r in {**done, **saved()}.items()
                                               if k not in map(key, runs)])

    def run(optimizer, lr, alpha=None, **settings):  # alpha: args.alpha unless the run names its own
        cfg = run_config(optimizer, lr, args.alpha if alpha is None else alpha, **settings)
        k = tuple(cfg.values())
        r = done.get(k) or quality_run(data_dir, vocab, args, cfg)
        runs.append(r)
        write_json(result(), out)
        print(f"{describe(r, args.alpha):>60} | final val loss {r['final_val_loss']:.4f} | "
              f"state {r['state_bytes'] / 1e6:6.2f} MB | {r['seconds']:.0f} s"
              + (f" (from {out})" if k in done else ""), flush=True)
        return r

    if args.quality_runs in ("pair", "adamw", "galore"):  # AdamW and GaLore at rank width/4 at their default lrs
        if args.quality_runs != "galore":
            run("adamw", 1e-3)
        if args.quality_runs != "adamw":
            run("galore", 1e-2, rank=width // 4)
        return result()
    if args.quality_runs == "long":  # issue 22's runs in priority order; --quality_part K/N takes every N-th
        k, n = args.quality_part
        for optimizer, lr, settings in LONG_RUNS[k::n]:
            run(optimizer, lr, **{**({"rank": width // 4} if optimizer == "galore" else {}), **settings})
        res = result()
        print_ratios(res["runs"], args.alpha)
        return res
    if args.quality_runs == "accum":  # per-layer updates with accumulation against the standard path
        for svd in ("full", "subspace"):  # the refresh on the first micro-batch's G: an exact SVD, or a power step
            standard, per_layer = (run("galore", 1e-2, rank=width // 4, svd=svd, accum=4, clip=0.0, per_layer=pl)
                                   for pl in (False, True))
            print(f"svd {svd}, 4 micro-batches, no clipping: per-layer / standard final val loss = "
                  f"{per_layer['final_val_loss']:.4f} / {standard['final_val_loss']:.4f} = "
                  f"{per_layer['final_val_loss'] / standard['final_val_loss']:.4f}")
        return result()
    if args.quality_runs == "residual":  # GaLore + Fira's residual at ranks width/4 and width/8, lr bracketed
        adamw = min((run(*c) for c in (("adamw", 1e-3), ("adamw_galore_lrs", 1e-2))), key=lambda r: r["final_val_loss"])
        for rank in (width // 4, width // 8):
            best = tune(lambda lr: run("galore", lr, rank=rank, residual=True), (3e-3, 1e-2))
            plain = run("galore", 1e-2, rank=rank)
            print(f"rank {rank}: GaLore + residual (lr {best['lr']:g}) {best['final_val_loss']:.4f}, GaLore "
                  f"{plain['final_val_loss']:.4f}, best AdamW ({describe(adamw, args.alpha)}) "
                  f"{adamw['final_val_loss']:.4f}: ratios {best['final_val_loss'] / adamw['final_val_loss']:.4f} "
                  f"and {plain['final_val_loss'] / adamw['final_val_loss']:.4f}")
        return result()
    if args.quality_runs == "refresh":  # the exact SVD against subspace iteration, same lr, T and seed
        for rank, gap in ((width // 4, 200), (width // 4, 50), (width // 2, 200)):
            exact, fast = (run("galore", 1e-2, rank=rank, gap=gap, svd=svd) for svd in ("full", "subspace"))
            print(f"rank {rank} T {gap}: subspace / exact SVD final val loss = {fast['final_val_loss']:.4f} / "
                  f"{exact['final_val_loss']:.4f} = {fast['final_val_loss'] / exact['final_val_loss']:.4f}")
        return result()
    # Starting grids: AdamW's best was 1e-3 at this size and GaLore's 1e-2 (it moves its matrices by
    # lr x alpha; the paper uses 1e-3 for AdamW and 1e-2 for GaLore); tune() widens them where needed.
    adamw = tune(lambda lr: run("adamw", lr), (3e-4, 1e-3, 3e-3))
    by_rank = {r: tune(lambda lr: run("galore", lr, rank=r), (3e-3, 1e-2, 3e-2))
               for r in (width // 4, width // 8, width // 2)}
    lr = by_rank[width // 4]["lr"]
    run("adamw_galore_lrs", lr)
    run("galore", lr, rank=width // 4, gap=50)
    run("galore", lr, rank=width // 4, reset=False)
    run("galore", lr, rank=width // 4, svd="randomized")
    run("galore", lr, rank=width // 4, svd="subspace")
    for r, b in sorted(by_rank.items()):
        print(f"rank {r}: best GaLore (lr {b['lr']:g}) / best AdamW (lr {adamw['lr']:g}) final val loss = "
              f"{b['final_val_loss']:.4f} / {adamw['final_val_loss']:.4f} = {b['final_val_loss'] / adamw['final_val_loss']:.4f}")
    return result()


def quality_chart(result, path):
    """Left: val loss curves of the best AdamW, the per-group control and the best GaLore at each rank, with and
    without the residual (in any of its forms). Right: final val loss against optimizer state bytes, every run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = result["runs"]
    alpha = result["alpha"]
    label = lambda r: describe(r, alpha)
    residual = lambda r: r.get("residual") or False  # False, True, 'fira' or 'scaled'
    plain = lambda r: run_key(r, alpha) == tuple(run_config(r["optimizer"], r["lr"], alpha, rank=r["rank"],
                                                            residual=residual(r)).values())
    groups = {}  # the runs that differ only by lr, by optimizer, rank and residual
    for r in runs:
        if plain(r):
            groups.setdefault((r["optimizer"], r["rank"], residual(r)), []).append(r)
    groups = groups or {i: [r] for i, r in enumerate(runs)}  # none plain (e.g. --quality_runs accum): each run
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for rs in groups.values():
        b = min(rs, key=lambda r: r["final_val_loss"])
        ax1.plot(*zip(*b["curve"]), label=label(b) + f": {b['final_val_loss']:.3f}")
    ax1.set(xlabel="step", ylabel="val loss (nats per byte)", title=f"best lr of each optimizer / rank,\n"
            f"{result['tokens']:,} tokens", ylim=(None, min(3.0, max(b["curve"][1][1] for rs in groups.values()
                                                                       for b in rs if len(b["curve"]) > 1))))
    ax1.legend(fontsize=8)
    for r in runs:
        if math.isfinite(r["final_val_loss"]):
            colors = {False: "C1", True: "C2", "fira": "C3", "scaled": "C4"}  # GaLore: plain, residuals
            color = "C0" if r["optimizer"] != "galore" else colors[residual(r)]
            ax2.scatter(r["state_bytes"] / 1e6, r["final_val_loss"], color=color)
            ax2.annotate(label(r), (r["state_bytes"] / 1e6, r["final_val_loss"]), fontsize=6)
    ax2.set(xlabel="optimizer state (MB)", ylabel="final val loss, whole split",
            title="quality vs optimizer memory\nblue AdamW, orange GaLore, green + residual, red + Fira's form,\n"
                  "purple + residual at lr x alpha (ScaledResidual)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def quality_part(text):
    """--quality_part K/N -> (K, N), with 0 <= K < N."""
    try:
        k, n = map(int, text.split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N with 0 <= K < N (e.g. 0/2 and 1/2 for two processes)")
    return k, n


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,60M", help="comma-separated presets")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--rank", type=int, default=None, help="GaLore rank (default: the paper's for each size)")
    p.add_argument("--gap", type=int, default=200, help="T used to amortize the measured refresh cost")
    p.add_argument("--batch_size", type=int, default=None, help="default: 1 (8 with --quality)")
    p.add_argument("--block_size", type=int, default=None, help="default: 1024 on CUDA, 128 on CPU, 256 with --quality")
    p.add_argument("--steps", type=int, default=None, help="timed steps (plus one warm-up; default 6), or training "
                   "steps with --quality (default 400)")
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--svd", action="store_true", help="time full vs randomized SVD instead")
    p.add_argument("--speed", action="store_true", help="optimizer step, refresh, launches and tok/s of each "
                   f"optimizer implementation, side by side ({', '.join(SPEED_IMPLS)})")
    p.add_argument("--count_only", action="store_true", help="with --speed: only count the launches (fake tensors)")
    p.add_argument("--plan", action="store_true", help="planned peak memory of each size and plan variant")
    p.add_argument("--svd_method", default="subspace", choices=["full", "randomized", "subspace"],
                   help="projector of the runs")
    p.add_argument("--svd_repeats", type=int, default=3)
    p.add_argument("--quality", action="store_true", help="AdamW vs GaLore final val loss on byte-level text (CPU)")
    p.add_argument("--quality_runs", default="sweep",
                   choices=["sweep", "pair", "adamw", "galore", "refresh", "long", "accum", "residual"],
                   help="with --quality: the whole sweep, AdamW vs GaLore (or either half of that pair alone, e.g. to "
                   "run them in two processes with two --out files), exact SVD vs subspace iteration, or the "
                   "long-horizon runs (LONG_RUNS: lr brackets and one change at a time from GaLore's defaults), or "
                   "GaLore's per-layer updates with 4 micro-batches against the standard path with 4, or GaLore + "
                   "Fira's residual (residual=True) at ranks width/4 and width/8, lr bracketed")
    p.add_argument("--quality_part", default="0/1", type=quality_part, metavar="K/N",
                   help="with --quality_runs long: only every N-th run from the K-th (0-based), so that N processes "
                   "given the same --out share the list")
    p.add_argument("--quality_text", default="stdlib", choices=list(QUALITY_TEXTS),
                   help="with --quality: docstrings of the standard library (1.2 MB), or also of torch, numpy and "
                   "matplotlib (8.5 MB, for the long horizon: --steps 4000)")
    p.add_argument("--alpha", type=float, default=0.25, help="GaLore scale, with --quality")
    p.add_argument("--eval_interval", type=int, default=50, help="with --quality")
    p.add_argument("--eval_iters", type=int, default=10, help="with --quality")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench.json", help="JSON results; the chart goes next to it as .png")
    args = p.parse_args()
    if args.quality and args.out == "bench.json":
        args.out = "quality.json"
    # Before anything runs, or the result would be lost at the end of it.
    folder = os.path.dirname(os.path.abspath(args.out))
    if msg := folder_problem(folder, "--out") or (not os.path.isdir(folder) and f"--out {args.out}: the folder "
                                                  f"{folder} does not exist; create it or choose another --out"):
        raise SystemExit(f"bench.py: {msg}")
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if args.quality:
        args.batch_size, args.block_size, args.steps = args.batch_size or 8, args.block_size or 256, args.steps or 400
        out = args.out
        result = quality_sweep(args, out)
        quality_chart(result, out.rsplit(".", 1)[0] + ".png")
        print(f"wrote {out} and {out.rsplit('.', 1)[0]}.png")
        return
    args.batch_size, args.steps = args.batch_size or 1, args.steps or 6
    args.block_size = args.block_size or (1024 if device.type == "cuda" or args.plan else 128)
    meta = dict(device=device_name, torch=torch.__version__, batch_size=args.batch_size,
                block_size=args.block_size, activation_checkpointing=args.activation_checkpointing)
    if args.svd:
        write_json(dict(meta, svd=svd_bench(args, device)), args.out)
        return
    if args.speed:
        if args.variants == ",".join(VARIANTS):
            args.variants = ",".join(SPEED_IMPLS)
        write_json(dict(meta, gap=args.gap, speed=speed_bench(args, device, device_name)), args.out)
        print(f"wrote {args.out}")
        return
    if args.plan:
        if args.variants == ",".join(VARIANTS):
            args.variants = ",".join(PLAN_VARIANTS)
        rows = plan_sweep(args, device)
        write_json(dict(meta, plans=rows), args.out)
        plan_chart(rows, args.out.rsplit(".", 1)[0] + ".png")
        print(f"wrote {args.out} and {args.out.rsplit('.', 1)[0]}.png")
        return
    results = []
    print(f"{device_name}, batch {args.batch_size} x {args.block_size} tokens" +
          (", activation checkpointing" if args.activation_checkpointing else ""))
    print(f"{'size':>5} {'variant':>15} {'weights MB':>10} {'grads MB':>9} {'state MB':>9} {'peak MB':>8} "
          f"{'tok/s':>8} {'tok/s T=' + str(args.gap):>10} {'opt ms':>7} {'opt ms T':>8} {'refresh ms':>10}")
    for size in args.sizes.split(","):
        for variant in args.variants.split(","):
            r = bench_one(size, variant, args, device)
            results.append(r)
            f = lambda v, spec: "-" if v is None else format(v, spec)
            print(f"{size:>5} {variant:>15} {r['param_mb']:10.1f} {r['grad_mb']:9.1f} {r['state_mb']:9.1f} "
                  f"{f(r['peak_mb'], '8.0f'):>8} {r['tokens_per_s']:8.0f} {r['tokens_per_s_amortized']:10.0f} "
                  f"{f(r['opt_step_ms'], '7.1f'):>7} {f(r['opt_step_amortized_ms'], '8.1f'):>8} "
                  f"{r['refresh_ms']:10.1f}", flush=True)
    write_json(dict(meta, results=results), args.out)
    chart(results, args.out.rsplit(".", 1)[0] + ".png", device_name)
    print(f"wrote {args.out} and {args.out.rsplit('.', 1)[0]}.png")


if __name__ == "__main__":
    main()
