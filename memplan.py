"""
Know the GPU memory before the GPU: follow every tensor a training step creates and report the peak.

    python train.py --size 7B --per_layer --param_dtype bfloat16 --activation_checkpointing --plan
    python bench.py --plan --sizes 125M,350M,1B,3B,7B          # every variant, table + chart

Run the real model and optimizer under PyTorch's FakeTensorMode and each operator runs with shapes and dtypes
but allocates nothing: a 7B training step executes in seconds on a laptop CPU. `MemoryTracker` sits on top and
sees the output of every operator. It keeps a table of the live tensor storages (bytes, category), adds a
storage when an operator creates it and drops it when Python frees it, and records the largest total.

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
rounding and fragmentation. The README gives that margin as measured on a GPU.
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("weights", "gradients", "optimizer state", "activations", "temporaries")


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
