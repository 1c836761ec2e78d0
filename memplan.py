"""
Know the GPU memory before the GPU: run your training step on fake tensors and get its peak.

    python train.py --size 7B --per_layer --param_dtype bfloat16 --activation_checkpointing --plan
    python bench.py --plan --sizes 125M,350M,1B,3B,7B          # every variant, table + chart

Your own model and loop, in a few lines (this file depends on torch only: copy it into your project):

    import torch
    from memplan import first_fit, gpu_bytes, plan, report

    def build():                 # your model and optimizer, created where your run creates them
        model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024))
        return model, torch.optim.AdamW(model.parameters(), foreach=False)

    def step(model, optimizer, i, batch=64):   # one training step of your loop: forward, backward, update
        x = torch.randn(batch, 1024)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    p = plan(build, step)            # two steps: the first creates the optimizer state
    print(report(p))                 # "peak 0.17 GB of tensors, during step 1: optimizer step; ..."
    print(gpu_bytes(p) <= 16e9)      # fits 16 GB free? (yours: torch.cuda.mem_get_info()[0]; x GPU_OVERHEAD inside)
    # The largest batch that fits in 1 GB: the first of these candidates whose plan fits.
    batch, need = first_fit([16384, 8192, 4096, 2048], lambda b: plan(build, lambda *a: step(*a, batch=b)), 1e9)
    print(batch, f"{need / 1e9:.2f} GB")

Under PyTorch's FakeTensorMode each operator runs with shapes and dtypes but allocates nothing: a 7B training
step executes in seconds on a laptop CPU. `MemoryTracker` sits on top and sees the output of every operator.
It keeps a table of the live tensor storages (bytes, category), adds a storage when an operator creates it and
drops it when Python frees it, and records the largest total.

Why a TorchDispatchMode of our own rather than torch.distributed._tools.mem_tracker.MemTracker: that one is a
private module that can change between releases, and its categories come from module and optimizer hooks
that do not see GaLore's per-layer updates, which run inside backward. This one is ~100 lines, and we sort
the bytes with facts we already have:
    weights            parameters and buffers (registered before the step)
    gradients          a tensor that becomes p.grad (a post-accumulate-grad hook names it)
    optimizer state    tensors held in optimizer.state (M, V, P; named after each update)
    activations        created during the forward pass: what backward needs, plus the loss over the logits
    temporaries        created during backward or the optimizer step: activation gradients, recomputed
                       activations (activation checkpointing), SVD workspace, fp32 copies, update buffers
A category found later is written into the same table entry, so the peak's breakdown is always final.

What it counts: tensor bytes, exactly (tested against real tensors: the same peak to the byte on a CPU).
What it does not: the CUDA context and library workspaces (cuBLAS, cuDNN, NCCL), and the caching allocator's
rounding and fragmentation: gpu_bytes() adds the margin measured on a GPU (GPU_OVERHEAD, docs/memory.md).
"""

import weakref
from contextlib import nullcontext

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("weights", "gradients", "optimizer state", "activations", "temporaries")
# Planned tensor bytes x this = what a CUDA GPU needs. Measured on an H100 (docs/memory.md): the allocated peak was
# at most 3.4% above the plan (library workspaces, the allocator's rounding), and the caching allocator reserved 8%
# more than it handed out. The CUDA context is not in it: compare with torch.cuda.mem_get_info()[0], the free
# memory, which already excludes it.
GPU_OVERHEAD = 1.15


class MemoryTracker(TorchDispatchMode):
    """Live tensor bytes at every operator, their peak, and what the peak is made of.

        tracker = MemoryTracker(model, optimizer)   # before attaching per-layer update hooks (see below)
        with tracker:
            tracker.phase = "step 1: forward"        # a label of your choosing, reported with the peaks
            ...
        tracker.peak, tracker.peak_phase, tracker.peak_breakdown(), tracker.phase_peaks
    """

    def __init__(self, model, optimizer):
        super().__init__()
        self.live = {}          # id(storage) -> [nbytes, category]; entries are shared with the peak snapshot
        self._finalizers = {}   # id(storage) -> the weakref.finalize that drops it from `live`
        self.now = 0            # live bytes
        self.peak, self.peak_phase, self._peak_entries = 0, None, []
        self.phase_peaks = {}   # phase label -> highest live bytes seen during it
        self.phase = "setup"
        self.optimizer = optimizer
        for t in [*model.parameters(), *model.buffers()]:
            self.track(t, "weights")
        # The gradient hook must run before a per-layer update hook frees p.grad: register the tracker first.
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: self.track(p.grad, "gradients"))
        optimizer.register_step_post_hook(lambda *_: self.label_optimizer_state())

    @property
    def phase(self):
        return self._phase

    @phase.setter
    def phase(self, label):  # a phase that allocates nothing still has a peak: what is live when it starts
        self._phase = label
        self.phase_peaks[label] = max(self.phase_peaks.get(label, 0), self.now)

    def label_optimizer_state(self):
        for state in self.optimizer.state.values():
            for t in state.values():
                if torch.is_tensor(t):
                    self.track(t, "optimizer state")

    def track(self, t, category):
        st = t.untyped_storage()
        key = id(st)  # a storage's Python object lives exactly as long as the storage itself
        if key in self.live:
            if category in ("weights", "gradients", "optimizer state"):  # a late, more precise label
                self.live[key][1] = category
            return
        self.live[key] = [st.nbytes(), category]
        self.now += st.nbytes()
        self._finalizers[key] = weakref.finalize(st, self._free, key)
        if self.now > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = self.now
        if self.now > self.peak:
            self.peak, self.peak_phase = self.now, self.phase
            self._peak_entries = list(self.live.values())  # references: later labels show up here too

    def _free(self, key):
        self.now -= self.live.pop(key)[0]
        del self._finalizers[key]

    def __exit__(self, *exc):
        # A finalizer holds the tracker, the tracker the optimizer, the optimizer the weights: detach them all,
        # or a plan on real tensors would keep its model alive for the life of the process.
        for f in self._finalizers.values():
            f.detach()
        self._finalizers.clear()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        category = "activations" if "forward" in self.phase else "temporaries"
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, category)
        return out

    def peak_breakdown(self):
        """Bytes per category at the moment of the peak (they add up to the peak)."""
        out = dict.fromkeys(CATEGORIES, 0)
        for nbytes, category in self._peak_entries:
            out[category] += nbytes
        return out


def plan(build, step, steps=2, attach=None, labels=None, fake=True):
    """Peak memory of `steps` training steps (see the example at the top), predicted on fake tensors.
        build() -> (model, optimizer): created on the device you plan for (a fake tensor takes no memory; the
                   tensors' dtypes, shapes and autocast are what count)
        step(model, optimizer, i): training step i; forward, backward and optimizer.step() are named in the
                   phases by hooks (model forward pre-hook, forward hook, optimizer step pre-hook)
        attach(model, optimizer): hooks that must come after the tracker's, e.g. per-layer updates that free
                   p.grad (the tracker's gradient hook must see it first)
        labels:    a name per step for the phases (default "step 1", "step 2", ...)
        fake=False runs the same steps on real tensors: how a plan is checked.
    Returns the peak and its phase, the bytes per category at the peak (they add up to it), every phase's
    peak, what is live at the end, and the model's parameter count, weight and optimizer-state bytes."""
    labels = labels or [f"step {i + 1}" for i in range(steps)]
    now = [labels[0]]  # the step in progress, for the hooks
    with FakeTensorMode() if fake else nullcontext():
        model, optimizer = build()
        tracker = MemoryTracker(model, optimizer)
        if attach is not None:
            attach(model, optimizer)
        name = lambda what: setattr(tracker, "phase", f"{now[0]}: {what}")
        hooks = [model.register_forward_pre_hook(lambda *_: name("forward")),
                 model.register_forward_hook(lambda *_: name("backward")),
                 optimizer.register_step_pre_hook(lambda *_: name("optimizer step"))]
        with tracker:
            for i in range(steps):
                now[0] = labels[i]
                step(model, optimizer, i)
        for h in hooks:
            h.remove()
        state = [t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
        return dict(peak_bytes=tracker.peak, peak_phase=tracker.peak_phase, bytes=tracker.peak_breakdown(),
                    phase_peaks=dict(tracker.phase_peaks), end_bytes=tracker.now,
                    params=sum(p.numel() for p in model.parameters()),
                    weight_bytes=sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
                    state_bytes=sum(t.numel() * t.element_size() for t in state))


def report(p):
    """A plan as text: the peak and its phase, the bytes per category at that moment, the peak of each phase."""
    gb = lambda b: f"{b / 1e9:6.2f} GB"
    lines = [f"peak {gb(p['peak_bytes'])} of tensors, during {p['peak_phase']}; at that moment:"]
    lines += [f"  {category:<16} {gb(b)}" for category, b in p["bytes"].items()]
    lines += ["peak of each phase:"]
    lines += [f"  {phase:<55} {gb(b)}" for phase, b in p["phase_peaks"].items() if phase != "setup"]
    return "\n".join(lines)


def gpu_bytes(p):
    """What a planned run needs on a CUDA GPU: its peak tensor bytes plus the measured margin."""
    return p["peak_bytes"] * GPU_OVERHEAD


def first_fit(candidates, plan_of, free_bytes):
    """The first candidate run that fits in free_bytes of GPU memory, and what it needs there: (c, gpu_bytes),
    or (None, None) when none does. plan_of(c) plans candidate c (None: c is not a run that can be made).
    Put the candidates in the order you prefer them, e.g. batch sizes from large to small."""
    for c in candidates:
        if (p := plan_of(c)) is not None and (need := gpu_bytes(p)) <= free_bytes:
            return c, need
    return None, None
