"""
Train a Llama on WikiText-103 with GaLoreAdamW (or AdamW for comparison).

    python train.py --size 125M                       # the main job (prepares the data first if needed)
    python train.py --size 60M --optimizer adamw      # the full-rank baseline
    python train.py --size tiny --input my.txt --device cpu --steps 200    # offline, on your own text
    python train.py --size cpu --input my.txt --tokenizer bytes           # byte-level, a CPU-sized model
    python train.py --size 125M --resume              # continue from out/ckpt.pt
    python train.py --size 7B --batch_size 1 --per_layer --param_dtype bfloat16 --activation_checkpointing --plan
                                                      # predicted peak memory (fake tensors, no GPU, ~16 s)
    torchrun --nproc_per_node 2 train.py --size 125M  # data parallel (DDP), one process per GPU

Writes to --out_dir: ckpt.pt (atomic, at every eval and at the end), log.jsonl, loss.png. On CUDA the run is
planned first (memplan.py): a run that does not fit takes the largest micro-batch that does (same tokens per step),
or stops with the flags that would make it fit.
Ctrl-C, SIGTERM (kill, SLURM, docker stop) and SIGHUP stop within seconds and save the last finished step (a
second signal ends at once). One run per --out_dir (a lock file). Paper: arXiv 2403.03507.
"""

import argparse
import atexit
import json
import math
import os
import secrets
import shutil
import signal
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist

from data import (WIKITEXT, DataError, check_token_ids, default_data_dir, folder_problem, get_batch, get_encoding,
                  iter_windows, load_meta, prepare)
from galore import GaLoreAdamW, attach_per_layer_updates, galore_param_groups, optimizer_state_bytes
from llama import PRESETS, Llama, LlamaConfig
import memplan

DEFAULT_RANK = {"tiny": 8, "cpu": 64, "60M": 128, "125M": 256, "350M": 256, "1B": 512,  # the paper's ranks per size
                "3B": 640, "7B": 512}  # ours (the paper: 7B 1024): see "Default ranks" in docs/memory.md


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and every default that is a value (a None default's help says what it means)."""
    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "%(default)" in action.help:  # `is`: a default of 0 or 0.0 is a value to show
            return action.help
        return action.help + " (default: %(default)s)"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--size", default="125M", choices=list(PRESETS), help="model preset (llama.py)")
    a("--optimizer", default="galore", choices=["galore", "adamw"], help="GaLoreAdamW or torch.optim.AdamW")
    a("--lr", type=float, default=None, help="peak learning rate (default: 0.01 galore, 0.001 adamw)")
    a("--steps", type=int, default=5000, help="optimizer steps")
    a("--batch_size", type=int, default=8, help="sequences per micro-batch (per process)")
    a("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--block_size", type=int, default=1024, help="tokens per sequence")
    a("--rank", type=int, default=None, help="GaLore rank r (default: the paper's for the size)")
    a("--update_proj_gap", type=int, default=200, help="GaLore T: steps between projector refreshes")
    a("--proj_start_steps", type=int, default=0, help="full-rank steps (matrices at lr x alpha) before GaLore")
    a("--galore_scale", type=float, default=0.25, help="GaLore alpha, scale of the projected update")
    a("--no_reset", action="store_true", help="keep the moments at a refresh (official GaLore behaviour)")
    a("--svd", default="subspace", choices=["full", "randomized", "subspace"],
      help="projector refresh: exact SVD, randomized torch.svd_lowrank, or subspace iteration from the previous P")
    a("--residual", action="store_true", help="also step along the gradient GaLore drops, scaled as Fira does "
      "(galore.py: Fira's residual)")
    a("--warmup_steps", type=int, default=None, help="linear LR warmup (default: 10%% of --steps)")
    a("--min_lr", type=float, default=None, help="cosine decays to this (default: 10%% of --lr)")
    a("--weight_decay", type=float, default=0.0, help="decoupled weight decay")
    a("--grad_clip", type=float, default=None, help="clip the global grad norm; 0 = off (default: 1.0, 0 with "
      "--per_layer)")
    a("--eval_interval", type=int, default=500, help="evaluate and checkpoint every this many steps")
    a("--eval_iters", type=int, default=20, help="validation batches per eval (a fixed slice)")
    a("--log_interval", type=int, default=10, help="steps between log lines")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
      help="autocast dtype (auto: bfloat16 on CUDA, float32 elsewhere)")
    a("--param_dtype", default="float32", choices=["float32", "bfloat16"],
      help="dtype of weights, gradients and optimizer states")
    a("--activation_checkpointing", action="store_true", help="recompute activations in backward")
    a("--per_layer", action="store_true", help="update each weight inside backward (never all grads at once)")
    a("--no_auto_batch", action="store_true", help="on CUDA, refuse a run that does not fit the free memory instead "
      "of splitting its batch into micro-batches (same tokens per step) and, if needed, checkpointing activations")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--device", default="auto", help="auto (cuda, mps, cpu), or e.g. cuda:1")
    a("--seed", type=int, default=1337, help="seed of the initial weights and of the batch order")
    a("--data_dir", default=None, help="folder of train.bin/val.bin/test.bin/meta.json (default: data/wikitext103, "
      "or data/<first input>_<tokenizer> with --input)")
    a("--input", nargs="+", metavar="FILE", help="build the data from these text files (default: WikiText-103)")
    a("--tokenizer", default=None, help="for data being built: gpt2 (the default), bytes (UTF-8 bytes, vocabulary "
      "257), or another tiktoken name; a data folder that exists brings its own")
    a("--out_dir", default="out", help="checkpoint, log and plot go here")
    a("--resume", action="store_true", help="continue from --out_dir/ckpt.pt")
    a("--sample_tokens", type=int, default=64, help="tokens to generate at the end")
    a("--wandb", metavar="PROJECT", default=None, help="also send log.jsonl's records to this Weights & Biases "
      "project (pip install wandb, then wandb login once, or set WANDB_MODE=offline; default: none)")
    a("--plan", action="store_true",
      help="predict this run's peak memory on fake tensors (no data, no GPU needed) and exit")
    args = p.parse_args(argv)
    args.lr = args.lr if args.lr is not None else (0.01 if args.optimizer == "galore" else 1e-3)
    args.rank = args.rank if args.rank is not None else DEFAULT_RANK[args.size]
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else args.steps // 10
    args.min_lr = args.min_lr if args.min_lr is not None else 0.1 * args.lr
    if args.grad_clip is None:
        args.grad_clip = 0.0 if args.per_layer else 1.0
    return args


def check_args(args, cfg, world_size):
    """Mistakes a user can make, as one line each (the optimizer checks its own hyperparameters too)."""
    for name in ("lr", "min_lr", "weight_decay", "grad_clip", "warmup_steps", "proj_start_steps", "sample_tokens"):
        v = getattr(args, name)
        if not 0 <= v < float("inf"):  # also catches NaN
            return f"--{name} {v} must be >= 0 and finite"
    for name in ("steps", "batch_size", "grad_accum", "block_size", "update_proj_gap", "eval_interval",
                 "eval_iters", "log_interval", "galore_scale"):
        if not 0 < getattr(args, name) < float("inf"):
            return f"--{name} {getattr(args, name)} must be > 0 and finite"
    if args.min_lr > args.lr:
        return f"--min_lr {args.min_lr} is above --lr {args.lr}: the schedule decays from --lr to --min_lr"
    for name in ("out_dir", "data_dir"):
        path = getattr(args, name)
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            return f"--{name} {path} is a file, not a folder: choose a folder"
    if args.device != "auto" and not args.plan and (msg := device_problem(args.device)):
        return msg
    if args.optimizer == "galore" and not 0 < args.rank < cfg.dim:
        return (f"--rank {args.rank} must be between 1 and the model width {cfg.dim} ({args.size}) minus 1; "
                f"try --rank {DEFAULT_RANK[args.size]}")
    if args.per_layer and args.grad_clip > 0:
        return ("--per_layer never holds all gradients at once, so it cannot clip their global norm: "
                "drop --grad_clip or use --grad_clip 0")
    if args.residual and args.optimizer != "galore":
        return "--residual is part of GaLore (the gradient its projection drops): use it with --optimizer galore"
    if args.residual and args.per_layer and args.grad_accum > 1:
        return ("--residual needs each step's whole gradient, which --per_layer with --grad_accum > 1 never holds: "
                "use --grad_accum 1, or drop --residual")
    if args.per_layer and world_size > 1:
        return "--per_layer is not supported with DDP (torchrun): run it on one process, or drop --per_layer"
    return None


# What a checkpoint's optimizer state was built with: a resumed run keeps these (docs/running.md).
RESUME_FIXED = ("optimizer", "rank", "update_proj_gap", "galore_scale", "weight_decay", "proj_start_steps",
                "no_reset", "svd", "residual")


def resume_problem(saved_args, args):
    """The first optimizer flag that differs from the checkpoint's, as one line; None if all agree. The saved
    state cannot honour a change (P has the saved rank, the schedule the saved gap), and torch's
    load_state_dict would silently restore the saved hyperparameters anyway."""
    for name in RESUME_FIXED:
        saved, value = saved_args.get(name), getattr(args, name)
        if name in saved_args and saved != value:
            # "use the saved value" also covers a default that changed since the checkpoint was written
            fix = (f"use --{name} {saved}" if not isinstance(saved, bool)
                   else f"drop --{name}" if value else f"add --{name}")
            return (f"--resume: --{name} {value} differs from the checkpoint's {saved}; a resumed run keeps the "
                    f"optimizer settings it was saved with: {fix}, or start a new run in another --out_dir")
    return None


def pick_device(device, ddp):
    """The device to train on; under DDP (torchrun) also joins the process group, one process per GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if ddp:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    return device


def load_data(data_dir, inputs, tokenizer, block_size, master=True, ddp=False):
    """(data_dir, meta) of the data to train on, prepared first if needed (by rank 0 under DDP). data_dir None
    is the default folder: WikiText-103's, or one of its own for --input text. Raises DataError (one line)."""
    explicit, data_dir = data_dir is not None, data_dir or default_data_dir(inputs, tokenizer or "gpt2")
    if master:  # a complete folder is used as it is; prepare() builds one, and refuses to mix sources
        meta = (None if inputs else load_meta(data_dir)) or prepare(data_dir, inputs, tokenizer or "gpt2")
    if ddp:
        dist.barrier()
        meta = load_meta(data_dir)  # every rank reads what rank 0 prepared
    if not explicit and not inputs and meta["source"] != WIKITEXT:  # own text is never taken for WikiText
        raise DataError(f"{data_dir} holds {meta['source']}, not WikiText-103: move it away, or train on it "
                        f"with --data_dir {data_dir}")
    if tokenizer not in (None, meta["tokenizer"]):
        raise DataError(f"{data_dir} holds {meta['tokenizer']} tokens, not --tokenizer {tokenizer}: drop the flag, "
                        "or choose another --data_dir")
    check_token_ids(data_dir, meta["vocab_size"])
    for split in ("train", "val"):  # fails early with a clear message if a batch cannot fit
        get_batch(data_dir, split, 1, block_size)
    return data_dir, meta


def read_checkpoint(path, cfg, args):
    """(checkpoint, None), loaded as tensors and numbers only (a damaged or foreign file cannot run code), or
    (None or checkpoint, one line saying why this run cannot resume from it)."""
    if not os.path.exists(path):
        return None, f"--resume: no checkpoint at {path}; start without --resume or set --out_dir"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not {"model", "optimizer", "config", "args", "step", "log", "rng"} <= ckpt.keys():
            raise KeyError("entries missing")
        saved = ckpt["config"]
        if saved["vocab_size"] != cfg.vocab_size:
            return None, (f"--resume: {path} has a vocabulary of {saved['vocab_size']:,} ids ({ckpt['args'].get('tokenizer', 'gpt2')}), "
                          f"the data in {ckpt['args']['data_dir']} gives {cfg.vocab_size:,}: resume on the data it was "
                          f"trained on (--data_dir {ckpt['args']['data_dir']}), or use another --out_dir")
        if saved != asdict(cfg):
            return None, (f"--resume: {path} holds a model of another shape ({ckpt['args']['size']}, block_size "
                          f"{saved['block_size']}); use the same --size/--block_size or another --out_dir")
    except Exception as e:  # torch's own message would suggest unpickling untrusted code: not repeated here
        return None, (f"--resume: {path} is not a readable train.py checkpoint ({type(e).__name__}); it is left as "
                      "it is. Start a new run with another --out_dir")
    if args.steps <= ckpt["step"]:
        return ckpt, (f"--resume: the checkpoint is at step {ckpt['step']}, so --steps {args.steps} leaves nothing to "
                      f"train; to continue, give more (e.g. --steps {2 * ckpt['step']})")
    return ckpt, resume_problem(ckpt["args"], args)


def device_problem(device):
    """Why --device cannot be used on this machine, or None."""
    try:
        d = torch.device(device)
    except RuntimeError:
        return f"--device {device!r} is not a device: use auto, cpu, cuda, cuda:N or mps"
    if d.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: no CUDA GPU is available to PyTorch on this machine; use --device cpu (or auto)"
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
    if d.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {device}: Apple's MPS is not available on this machine; use --device cpu (or auto)"
    if d.type not in ("cpu", "cuda", "mps"):
        return f"--device {device}: train.py runs on cpu, cuda or mps"
    return None


def get_lr(it, lr, min_lr, warmup_steps, steps):
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at step `steps`."""
    if it < warmup_steps:
        return lr * (it + 1) / warmup_steps
    progress = min(1.0, (it - warmup_steps) / max(1, steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def model_config(args, vocab_size=None):
    """The preset's shape with this run's block size; the vocabulary is the data's (meta.json), padded up to a
    multiple of 64 for faster matmuls (GPT-2: 50257 -> 50304; bytes: 257 -> 320). Without it, the tokenizer's."""
    vocab_size = vocab_size or (257 if args.tokenizer == "bytes" else 50257)
    return LlamaConfig(**{**PRESETS[args.size], "vocab_size": 64 * math.ceil(vocab_size / 64),
                          "block_size": args.block_size, "activation_checkpointing": args.activation_checkpointing})


def build_model(cfg, param_dtype):
    model = Llama(cfg)
    if param_dtype == "bfloat16":
        for p in model.parameters():  # parameters only: the RoPE tables stay fp32
            p.data = p.data.to(torch.bfloat16)
    return model


def autocast_context(device_type, dtype, param_dtype):
    """bf16 autocast for fp32 weights when dtype is bfloat16; bf16 weights compute in bf16 anyway."""
    if dtype == "float32" or param_dtype == "bfloat16":
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def build_optimizer(model, args, verbose=True, foreach=None):
    if args.optimizer == "galore":
        groups = galore_param_groups(model, args.rank, args.update_proj_gap, args.galore_scale, verbose=verbose)
        return GaLoreAdamW(groups, lr=args.lr, weight_decay=args.weight_decay, proj_start_steps=args.proj_start_steps,
                           reset_on_update=not args.no_reset, svd=args.svd, residual=args.residual, foreach=foreach)
    if args.per_layer:  # needs step_param(); GaLoreAdamW without 'rank' is AdamW to the last bit (tested)
        return GaLoreAdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # foreach=None is torch's choice (and GaLoreAdamW's): the multi-tensor kernels on CUDA, whose temporaries (e.g.
    # sqrt(V) of every weight at once) make AdamW's peak 20% higher at 1B on an H100; the plan passes it explicitly.
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, foreach=foreach)


def forward_backward(model, next_batch, grad_accum, ctx, ddp=False, before_last=None):
    """Accumulate the gradients of grad_accum micro-batches. Returns the mean loss over them (and over ranks
    under DDP: what is logged, and the same NaN verdict on every rank), as a tensor. before_last() is called
    before the last micro-batch, whose backward applies per-layer updates (main() holds Ctrl-C from there)."""
    mean_loss = 0.0
    for micro in range(grad_accum):
        if micro == grad_accum - 1 and before_last:
            before_last()
        if ddp:  # all-reduce the gradients on the last micro-step only
            model.require_backward_grad_sync = micro == grad_accum - 1
        x, y = next_batch()
        with ctx:
            _, loss = model(x, y)
        (loss / grad_accum).backward()
        mean_loss = mean_loss + loss.detach() / grad_accum
    if ddp:
        dist.all_reduce(mean_loss, op=dist.ReduceOp.SUM)  # gloo has no AVG
        mean_loss /= dist.get_world_size()
    return mean_loss


def optimizer_step(model, optimizer, grad_clip, per_layer, check_finite=True):
    """Clip, step, free the gradients. Returns the global grad norm before clipping (a tensor), or None with
    per-layer updates (every weight was already updated inside backward, and no gradient is left).
    check_finite=False only for the memory plan: fake tensors have no values to check."""
    norm = None
    if not per_layer:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        if check_finite and not torch.isfinite(norm):  # never apply a non-finite update: the caller stops
            optimizer.zero_grad(set_to_none=True)
            return norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def plan_memory(args, device_type, fake=True):
    """Peak memory of this run, predicted by executing its training steps on fake tensors (memplan.py):
    the model, dtypes, optimizer, per-layer hooks, activation checkpointing and batch of the real run, but
    nothing is allocated or computed. device_type is the run's ("cuda" plans a GPU run, also on a machine
    without one: the fake tensors then live on the CPU, and autocast is applied as on CUDA).
    Two steps: the first (states created, GaLore's first SVDs), then a refresh with the states in place
    (with --proj_start_steps: the switch from full-rank moments to low rank, the larger moment).
    fake=False runs the same steps on real tensors: how the tests and bench.py check the plan."""
    device = device_type if device_type != "cuda" or torch.cuda.is_available() else "cpu"
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if device_type == "cuda" else "float32"
    ctx = autocast_context(device, dtype, args.param_dtype)
    cfg = model_config(args)

    def build():
        if fake:  # Module.to() cannot move fake parameters: create them on the device
            with torch.device(device):
                model = build_model(cfg, args.param_dtype)
        else:  # as main() does: built on the CPU, so the GPU never holds the fp32 weights of a bf16 run
            model = build_model(cfg, args.param_dtype).to(device)
        # what torch picks for real tensors (fake ones make it fall back to its for-loop)
        return model, build_optimizer(model, args, verbose=False, foreach=device_type == "cuda")

    # Micro-batch 1 creates the gradients (or, per-layer, the R sums), 2 adds into them, the last updates; any
    # other is micro-batch 2 again, byte for byte: planned with at most 3, so a 7B plan of 64 takes seconds.
    micro_batches = min(args.grad_accum, 3)
    attach = (lambda model, optimizer: attach_per_layer_updates(model, optimizer, micro_batches)) if args.per_layer \
        else None
    steps = [(0, "step 1 (states created" + (", projectors computed)" if args.optimizer == "galore"
                                             and not args.proj_start_steps else ")"))]
    if args.optimizer == "galore":
        s = args.proj_start_steps or args.update_proj_gap
        steps.append((s, f"step {s + 1} (" + ("switch to low rank)" if args.proj_start_steps else "refresh)")))
        if args.per_layer and micro_batches > 1:  # R sums next to all moments (a refresh frees the old ones)
            steps.append((s + 1, f"step {s + 2} (accumulating R with the moments in place)"))
    else:
        steps.append((1, "step 2"))

    def step(model, optimizer, i):  # train.py's own step (forward_backward, optimizer_step) on random tokens
        optimizer.steps_taken = steps[i][0]  # GaLoreAdamW's schedule counter (ignored by torch's AdamW)
        next_batch = lambda: tuple(torch.randint(0, cfg.vocab_size, (args.batch_size, args.block_size),
                                                 device=device) for _ in "xy")  # (x, y)
        forward_backward(model, next_batch, micro_batches, ctx)
        optimizer_step(model, optimizer, args.grad_clip, args.per_layer, check_finite=False)

    planned = memplan.plan(build, step, len(steps), attach, [label for _, label in steps], fake)
    return dict(size=args.size, optimizer=args.optimizer, rank=args.rank if args.optimizer == "galore" else None,
                per_layer=args.per_layer, param_dtype=args.param_dtype, autocast=dtype,
                activation_checkpointing=args.activation_checkpointing, batch_size=args.batch_size,
                block_size=args.block_size, grad_accum=args.grad_accum, **planned)


def gpu_memory_problem(args, device):
    """On CUDA, before the data and the model are loaded: the run planned (memplan.py) against the GPU's free
    memory. Returns (changes, line): ({}, None) if it fits as asked. If not, and unless --no_auto_batch, the
    largest micro-batch that fits with the same tokens per optimizer step (--batch_size split, --grad_accum raised
    to match), with activation checkpointing turned on only if no micro-batch fits without it: changes to args
    and the line that says so. Otherwise (None, a line naming the flags with which it would fit). Each candidate is
    planned too, in seconds. The vocabulary planned is --tokenizer's (GPT-2's by default): the data's is not read
    yet."""
    free = torch.cuda.mem_get_info(device)[0]
    def plan_of(changes):  # the plan of this run with these changes to its flags, None if they make it invalid
        a = argparse.Namespace(**{**vars(args), **changes})
        return None if check_args(a, model_config(a), 1) else plan_memory(a, "cuda")
    try:
        planned = memplan.gpu_bytes(plan_of({}))
    except Exception as e:  # a run the planner cannot plan still runs
        print(f"memory plan skipped ({type(e).__name__}: {str(e)[:200]})")
        return {}, None
    if planned <= free:
        return {}, None
    B, T, gb = args.batch_size, args.block_size, lambda b: f"{b / 1e9:.1f} GB"
    if not args.no_auto_batch:  # micro-batches from large to small; checkpointing only if none fits without it
        splits = [dict(batch_size=b, grad_accum=args.grad_accum * B // b, activation_checkpointing=ckpt)
                  for ckpt in sorted({args.activation_checkpointing, True}) for b in range(B, 0, -1)
                  if B % b == 0 and (b, ckpt) != (B, args.activation_checkpointing)]
        changes, fit = memplan.first_fit(splits, plan_of, free)
        if changes:
            b, ckpt = changes["batch_size"], changes["activation_checkpointing"]
            how = [f"micro-batches of {b} x {T} with --grad_accum {changes['grad_accum']}"] if b < B else []
            how += ["--activation_checkpointing"] if ckpt and not args.activation_checkpointing else []
            return changes, (f"{B} x {T} tokens need about {gb(planned)} of GPU memory, {gb(free)} are free: "
                             f"{' and '.join(how)} ({gb(fit)}), the same {B * T * args.grad_accum:,} tokens per "
                             "step (--no_auto_batch refuses instead)")
    # Otherwise the memory switches this run is not using yet, cumulatively, the last micro-batches of one.
    n, candidates, flags, changes = B * args.grad_accum, [], [], {}
    for flag, change in (("--activation_checkpointing", dict(activation_checkpointing=True)),
                         ("--param_dtype bfloat16", dict(param_dtype="bfloat16")),
                         ("--per_layer", dict(per_layer=True, grad_clip=0.0)),
                         (f"--batch_size 1 --grad_accum {n}", dict(batch_size=1, grad_accum=n))):
        if any(getattr(args, k) != v for k, v in change.items()):
            flags, changes = flags + [flag], {**changes, **change}
            candidates.append((" ".join(flags), changes))
    found, fit = memplan.first_fit(candidates, lambda c: plan_of(c[1]), free)
    if found:
        return None, (f"this run needs about {gb(planned)} of GPU memory but {gb(free)} are free; with "
                      f"{found[0]} it needs about {gb(fit)} (details: add --plan)")
    return None, (f"this run needs about {gb(planned)} of GPU memory but {gb(free)} are free, and no memory "
                  f"switch makes it fit; use a smaller --size or --rank (details: add --plan)")


def print_plan(plan):
    print(f"memory plan: {plan['size']} ({plan['params']:,} parameters), {plan['optimizer']}"
          + (f" rank {plan['rank']}" if plan["rank"] else "") + f", {plan['param_dtype']} weights"
          + (", per-layer updates" if plan["per_layer"] else "")
          + (", activation checkpointing" if plan["activation_checkpointing"] else "")
          + f", batch {plan['batch_size']} x {plan['block_size']} tokens"
          + (f", {plan['grad_accum']} micro-batches per step" if plan["grad_accum"] > 1 else ""))
    print(memplan.report(plan))
    print(f"a CUDA GPU needs about {memplan.gpu_bytes(plan) / 1e9:.2f} GB free (tensor bytes x {memplan.GPU_OVERHEAD}, "
          "the margin measured for the allocator and library workspaces: docs/memory.md)")


@torch.no_grad()
def evaluate(model, data_dir, split, batch_size, block_size, iters, device, ctx, progress=False):
    """Mean loss on a fixed slice of the split (the same `iters` batches every eval), or, with iters=None, on
    all of it (data.iter_windows). progress=True counts the batches on one line (a slow first eval on a CPU)."""
    model.eval()
    if iters is None:
        batches = iter_windows(data_dir, split, batch_size, block_size, device)
    else:
        gen = torch.Generator().manual_seed(1234)
        batches = (get_batch(data_dir, split, batch_size, block_size, device, gen) for _ in range(iters))
    total, rows = 0.0, 0
    for i, (x, y) in enumerate(batches):
        with ctx:
            total += model(x, y)[1].item() * len(x)  # weighted by rows: the last window batch may be short
        rows += len(x)
        if progress:
            print(f"\reval batch {i + 1}/{iters}", end="\n" if i + 1 == iters else "", flush=True)
    model.train()
    return total / rows


def sample_text(model, enc, n_tokens, device, ctx, seed):
    """n_tokens generated after an end-of-text token (temperature 0.8, top-k 50), decoded."""
    prompt = torch.tensor([[enc.eot_token]], device=device)
    with ctx:
        ids = model.generate(prompt, n_tokens, temperature=0.8, top_k=50,
                             generator=torch.Generator(device).manual_seed(seed))
    # ids past the tokenizer's pad the vocabulary to a multiple of 64; an early model can still emit them
    return enc.decode([t for t in ids[0, 1:].tolist() if t < enc.n_vocab])


def replicas_agree(model):
    """Under DDP, whether every rank holds bit-identical weights. A projector that differed between ranks
    (an SVD sign flip) would make the replicas drift apart silently; this catches it. Compares one integer
    per parameter: the sum of its fp32 bit patterns."""
    fp = torch.stack([p.detach().float().view(torch.int32).sum(dtype=torch.int64) for p in model.parameters()])
    all_fp = [torch.zeros_like(fp) for _ in range(dist.get_world_size())]
    dist.all_gather(all_fp, fp)
    return all(torch.equal(f, all_fp[0]) for f in all_fp)


def all_finite(model, optimizer):
    """Whether every weight and optimizer-state tensor is finite: what may be written over a good checkpoint."""
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return all(torch.isfinite(t).all() for t in [*model.parameters(), *state])


def disk_problem(model, optimizer, out_dir, ckpt_path):
    """Whether the disk of --out_dir can take the next checkpoint, as one line; None if it can. Asked after the
    run's first step, when the optimizer state has its size. The atomic save writes the new checkpoint next to
    the last one before replacing it, so the free space must hold a whole one: weights + optimizer state."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    need = sum(storages.values()) + optimizer_state_bytes(optimizer)  # a tied embedding is saved once
    free = shutil.disk_usage(out_dir).free
    if free >= need:
        return None
    return (f"--out_dir {out_dir}: its disk has {free / 1e9:.3g} GB free, but a checkpoint of this run takes "
            f"about {need / 1e9:.3g} GB, written next to the last one ({ckpt_path}, kept) before replacing it: free "
            "some space and continue with --resume, or start again with another --out_dir")


def perplexity(loss):
    return math.exp(loss) if loss < 700 else float("inf")  # exp overflows a float past ~709


class WriteError(Exception):
    """A file of the run could not be written (disk full, read-only, permissions, ...): one line for the user."""


def save_atomic(obj, path, write=None):
    """Write to a temporary file, then rename it over path (atomic): an interruption or crash mid-write leaves
    the previous file intact, and the temporary one is removed. The temporary name has the pid in it, so two
    processes writing one file (bench.py --quality_part) never mix their bytes. An OS error (torch.save reports
    a full disk as a RuntimeError from its zip writer) becomes a WriteError naming the file, the reason and what
    is kept."""
    tmp, write = f"{path}.{os.getpid()}.tmp", write or torch.save
    try:
        write(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:150]
        if not isinstance(e, OSError) and shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 2**20:
            reason = "no space left on the device"  # what torch's "unexpected pos" error means there
        kept = "the previous one is kept" if os.path.exists(path) else "nothing was written"
        raise WriteError(f"could not write {path} ({reason}); {kept}") from None
    finally:
        try:
            os.remove(tmp)
        except OSError:  # not there (renamed, or never created)
            pass


def take_lock(out_dir):
    """One run per --out_dir: out_dir/lock holds the pid of the run using it, created atomically (O_EXCL). A lock
    whose process no longer exists (kill -9, a reboot) is taken over, with a line that says so. Returns a
    function that releases it, or raises WriteError naming the pid that holds it."""
    path = os.path.join(out_dir, "lock")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if (pid := lock_holder(path)) is not None:
                raise WriteError(f"another run (pid {pid}) is using --out_dir {out_dir}: wait for it to end, stop it "
                                 f"(kill {pid} saves its last step), or choose another --out_dir") from None
            try:
                os.remove(path)  # stale: taken over on the next try
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lambda: os.path.exists(path) and os.remove(path)
    raise WriteError(f"could not take the lock {path}; remove it if no run is using --out_dir {out_dir}")


def lock_holder(path):
    """The pid of the live process that holds the lock file at path, or None if the lock is stale."""
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):  # gone, or half-written by a run killed while taking it
        return None
    if pid <= 0 or pid == os.getpid():  # this same process: an earlier main() (tests call it in-process)
        return None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        print(f"{path}: taking over the lock of pid {pid}, which no longer runs")
        return None
    except PermissionError:  # alive, another user's
        pass
    return pid


def write_jsonl(records, path):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def plot(log, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [(r["step"], r["loss"]) for r in log if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    mem = [(r["step"], r["peak_mem_gb"]) for r in log if r.get("peak_mem_gb")]
    fig, axes = plt.subplots(1, 2 if mem else 1, figsize=(11 if mem else 6, 4), squeeze=False)
    ax = axes[0][0]
    for pts, label in ((train, "train"), (val, "val")):
        if pts:
            ax.plot(*zip(*pts), label=label, marker="o" if label == "val" else None)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    if mem:
        axes[0][1].plot(*zip(*mem))
        axes[0][1].set(xlabel="step", ylabel="GB", title="peak GPU memory")
    fig.tight_layout()
    save_atomic(fig, path, lambda fig, tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


class CtrlC:
    """Ctrl-C, and the signals that mean the same: SIGTERM (`kill`, SLURM at a job's time limit, `docker stop`,
    Kubernetes, a spot instance about to be taken) and SIGHUP (the terminal or SSH session closed). The first one
    stops a single-process run within seconds: wherever it lands (an eval, the forward or backward of a step, the
    data), the run goes back to the last finished step, saves it and exits with 128 + the signal's number (130
    Ctrl-C, 143 SIGTERM, 129 SIGHUP). Only while the weights are changing (`with ctrl_c.wait():` the optimizer
    step, per-layer updates inside backward, the writing of a checkpoint or log) does it wait for that to end. A
    second one ends the run at once; the files on disk are then the last complete ones, since each is written
    under a temporary name and renamed. Under DDP (torchrun forwards SIGTERM to every worker) every signal waits
    for the end of the step: all ranks must stop at the same step, and rank 0 saves."""
    SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM",
               **({signal.SIGHUP: "SIGHUP"} if hasattr(signal, "SIGHUP") else {})}  # Windows has no SIGHUP

    def __init__(self, ddp):
        self.presses, self.depth, self.ddp = 0, 0, ddp  # depth: how many wait() blocks we are in
        self.signum = signal.SIGINT  # the first signal's, for the exit code (a KeyboardInterrupt is Ctrl-C's)
        for signum in self.SIGNALS:
            signal.signal(signum, self.handler)

    def handler(self, signum, frame):
        if not self.presses:
            self.signum = signum
        self.presses += 1
        if self.presses > 1 or not (self.depth or self.ddp):
            raise KeyboardInterrupt

    @contextmanager
    def wait(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.presses and not self.depth and not self.ddp:
            raise KeyboardInterrupt  # the press that came while waiting

    @contextmanager
    def holding(self, enabled):
        """Yields hold(), which makes a signal wait from when it is called to the end of the with-block (None if
        not enabled)."""
        with ExitStack() as held:
            yield (lambda: held.enter_context(self.wait())) if enabled else None


def fail(msg):
    sys.exit(f"train.py: error: {msg}")  # one line, exit status 1, no traceback


def import_wandb():
    """wandb, an optional import (never in requirements.txt): checked before the data, so that a missing package
    is said at once and not after a download."""
    try:
        import wandb
    except ImportError:
        fail("--wandb needs the wandb package, which train.py does not require: pip install wandb, or drop --wandb")
    return wandb


def start_wandb(wandb, project, args, saved_id):
    """A wandb run that gets the records of log.jsonl. A resumed run continues the wandb run of its checkpoint:
    its id is kept in args, which the checkpoint saves (the steps a resume repeats are logged again by
    log.jsonl; wandb keeps the first values of a step it has seen)."""
    args.wandb_id = saved_id or secrets.token_hex(4)
    run = wandb.init(project=project, id=args.wandb_id, resume="allow", config=vars(args), dir=args.out_dir)
    return lambda record: run.log({k: v for k, v in record.items() if k != "step" and v is not None},
                                  step=record["step"])


def stop_nonfinite(what, step, ckpt_path, master):
    """A loss, gradient norm or weight that is no longer finite ends the run before it can be saved. Every rank
    that gets here exits (a loss or grad norm is the same on all of them; the val loss is rank 0's alone, and
    torchrun then stops the others); rank 0 says why."""
    if master:
        kept = f"the last good checkpoint is kept in {ckpt_path}" if os.path.exists(ckpt_path) else "nothing was saved"
        print(f"train.py: error: {what} at step {step}; stopping before it can be saved: {kept}. Try a lower --lr",
              file=sys.stderr)
    sys.exit(1)


def rng_state(gen):
    """The run's two random streams: batch sampling (gen) and torch's global one (the randomized SVD's sketch)."""
    return {"batch": gen.get_state(), "torch": torch.get_rng_state()}


def restore(ckpt, model, optimizer, gen):
    """Weights, optimizer state and random streams from a checkpoint. Returns (step, log) to go on from: the log
    as it was when saved (lines written after that checkpoint are dropped)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    gen.set_state(ckpt["rng"]["batch"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt["step"], ckpt["log"]


def ddp_stop(pressed, model, it, check_replicas, device, master):
    """Under DDP, at the start of each step: whether Ctrl-C was pressed on any rank (all ranks stop at the same
    step: one raising mid-collective would hang the others); at evals, also a check that the replicas hold
    bit-identical weights."""
    stop = torch.tensor(float(pressed), device=device)
    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    if stop.item():
        return True
    if check_replicas:
        if not replicas_agree(model):
            fail(f"DDP replicas differ at step {it}; please report this as a bug")
        if master:
            print(f"step {it}: weights identical on all {dist.get_world_size()} ranks")
    return False


def print_eta(step, dt, steps):
    """After the first step of a run (when it is not a log step): its time and how long the run will take."""
    eta = steps * dt
    print(f"step {step} took {dt:.1f} s: the {steps} steps of this run take about "
          + (f"{eta / 60:.0f} min" if eta < 7200 else f"{eta / 3600:.1f} h") + " at this pace, plus evals", flush=True)


def print_step(r, steps, eta_s):
    """The console line of a training step's log record."""
    norm = "-" if r["grad_norm"] is None else f"{r['grad_norm']:.3f}"
    print(f"step {r['step']}/{steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | grad norm {norm} | "
          f"{r['tokens_per_s']:,.0f} tok/s | ETA {eta_s / 60:.1f} min | opt state {r['opt_state_mb']:.1f} MB"
          + (f" | peak mem {r['peak_mem_gb']:.2f} GB" if r["peak_mem_gb"] is not None else ""))


class Run:
    """What a run keeps besides the model and the optimizer: its files in --out_dir (ckpt.pt, log.jsonl, loss.png,
    and wandb if asked), the signals (ctrl_c), and where it stands: `done` steps applied, `rng` both random streams
    at that point. Those two change together with the weights, inside ctrl_c.wait(), so a signal anywhere saves a
    state that a resume continues exactly (it repeats an unfinished step with the same batch)."""

    def __init__(self, args, cfg, model, optimizer, gen, start, log, send, master, ddp, tokens_per_step):
        self.args, self.cfg, self.model, self.optimizer, self.gen = args, cfg, model, optimizer, gen
        self.tokens_per_step = tokens_per_step  # all ranks', all micro-batches'
        self.start, self.log, self.send, self.master = start, log, send, master
        self.ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
        self.cuda = torch.device(args.device).type == "cuda"
        self.ctrl_c = CtrlC(ddp)
        self.done, self.rng, self.dt_avg = start, rng_state(gen), None

    def peak_gb(self):
        return torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None

    def stop_nonfinite(self, what, step):
        stop_nonfinite(what, step, self.ckpt_path, self.master)

    def checkpoint(self, step):
        if self.master:
            if not all_finite(self.model, self.optimizer):  # never replace a good checkpoint with a broken one
                self.stop_nonfinite("the weights or optimizer states are no longer finite", step)
            save_atomic({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "config": asdict(self.cfg), "args": vars(self.args), "step": step, "log": self.log,
                         "rng": self.rng}, self.ckpt_path)

    def write_log(self, record):
        self.log.append(record)  # the file is rewritten whole (a resume drops what came after its checkpoint)
        save_atomic(self.log, os.path.join(self.args.out_dir, "log.jsonl"), write_jsonl)
        if self.send:
            self.send(record)

    def evaluate(self, it, data_dir, ctx):
        """Val loss on the fixed slice -> log, checkpoint and loss.png (not again for a step the log holds)."""
        if any(r["step"] == it and "val_loss" in r for r in self.log):
            return
        a = self.args
        slow = it == self.start and not self.cuda  # say what is happening before the first numbers
        if slow:
            print(f"step {it}: evaluating on {a.eval_iters} val batches...", flush=True)
        val = evaluate(self.model, data_dir, "val", a.batch_size, a.block_size, a.eval_iters, a.device, ctx, slow)
        if not math.isfinite(val):
            self.stop_nonfinite(f"validation loss is {val}", it)
        with self.ctrl_c.wait():
            self.write_log({"step": it, "val_loss": val, "val_ppl": perplexity(val), "peak_mem_gb": self.peak_gb()})
            print(f"step {it}: val loss {val:.4f}, perplexity {perplexity(val):.1f}")
            self.checkpoint(it)
            plot(self.log, os.path.join(a.out_dir, "loss.png"))

    def stepped(self, it, t0, loss, lr, norm):
        """After optimizer step `it` (inside ctrl_c.wait()): record it as done; on the run's first step check the
        disk and print the ETA; every log_interval steps a log line. One host-device sync per step (here and
        the loss's .item()): a non-finite value must stop the run before it is saved."""
        norm = None if norm is None else norm.item()
        if norm is not None and not math.isfinite(norm):  # not applied: the weights are still step it's
            self.stop_nonfinite(f"gradient norm is {norm}", it)
        self.done, self.rng = it + 1, rng_state(self.gen)
        first, a = it == self.start, self.args
        if first and self.master and (msg := disk_problem(self.model, self.optimizer, a.out_dir, self.ckpt_path)):
            fail(msg)  # now, not at the next checkpoint; the last one, a step behind, is kept
        if self.cuda:
            torch.cuda.synchronize()
        dt = time.time() - t0
        self.dt_avg = dt if it <= self.start + 1 else 0.9 * self.dt_avg + 0.1 * dt  # step `start` compiles: left out
        if first and self.master and (it + 1) % a.log_interval:  # how long this run takes, early
            print_eta(it + 1, dt, a.steps - self.start)
        if (it + 1) % a.log_interval == 0 and self.master:
            self.write_log({"step": it + 1, "loss": loss, "lr": lr, "grad_norm": norm,
                            "tokens_per_s": self.tokens_per_step / dt,
                            "opt_state_mb": optimizer_state_bytes(self.optimizer) / 1e6, "peak_mem_gb": self.peak_gb()})
            print_step(self.log[-1], a.steps, (a.steps - it - 1) * self.dt_avg)

    def finish(self, data_dir, ctx):
        """The final figure on the whole val split, saved with the model; and a sample of its text."""
        a = self.args
        val = evaluate(self.model, data_dir, "val", a.batch_size, a.block_size, None, a.device, ctx)
        with self.ctrl_c.wait():
            self.write_log({"step": a.steps, "final_val_loss": val, "final_val_ppl": perplexity(val)})
            self.checkpoint(a.steps)  # again, so that the log it holds has the final figure too
        try:  # data tokenized on another machine: this one may lack the tokenizer's files, and the run is done
            print("sample:", sample_text(self.model, get_encoding(a.tokenizer), a.sample_tokens, a.device, ctx, a.seed))
        except DataError as e:
            print(f"sample skipped: {e}")
        peak = f", peak mem {self.peak_gb():.2f} GB" if self.cuda else ""
        print(f"done: {a.size} {a.optimizer}, {a.steps} steps, {a.steps * self.tokens_per_step:,} tokens | "
              f"val loss (whole split) {val:.4f}, perplexity {perplexity(val):.2f} | opt state "
              f"{optimizer_state_bytes(self.optimizer) / 1e6:.1f} MB{peak}")

    def interrupted(self):
        """A signal: save the `done` steps (nothing of the next one was applied) and exit with 128 + its number."""
        name = CtrlC.SIGNALS[self.ctrl_c.signum]
        msg = f"stopped at once (a second {name}): {self.ckpt_path}, if any, is the last complete checkpoint"
        try:
            if self.ctrl_c.presses == 1:
                self.checkpoint(self.done)  # a second signal raises here at once
                msg = (f"interrupted{'' if name == 'Ctrl-C' else ' by ' + name}: checkpoint saved at step {self.done} "
                       f"in {self.ckpt_path}; continue with --resume")
        except KeyboardInterrupt:  # a second signal during the save: the temporary file is removed, the old kept
            pass
        except WriteError as e:
            msg = f"interrupted, but the last step could not be saved: {e}"
        if self.master:
            print("\n" + msg, flush=True)
        sys.exit(128 + self.ctrl_c.signum)


def prepare_run(args, ddp, master):
    """Everything a run needs before its model, each problem said in one line before anything is built:
    --out_dir, wandb, the device and dtype, GPU memory (a run that does not fit takes a smaller micro-batch or
    stops), the data (prepared on first use) and the checkpoint to resume. Returns (data_dir, cfg, ckpt, ctx, wandb)."""
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if not args.resume and os.path.exists(ckpt_path):  # never overwrite an earlier run's checkpoint by accident
        fail(f"{ckpt_path} exists: continue it with --resume, or choose another --out_dir")
    if master and (msg := folder_problem(args.out_dir, "--out_dir")):  # before the data: a first run downloads it
        fail(msg)
    wandb = import_wandb() if args.wandb and master else None
    args.device = pick_device(args.device, ddp)
    device_type = torch.device(args.device).type
    if args.dtype == "auto":
        args.dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if device_type == "cuda" and not ddp:  # before the data (a first run downloads it) and the model
        changes, msg = gpu_memory_problem(args, args.device)
        if changes is None:
            fail(msg)  # an out-of-memory error later would say less
        vars(args).update(changes)  # saved with the checkpoint as the run's own flags
        if msg:
            print(msg)
    try:
        data_dir, meta = load_data(args.data_dir, args.input, args.tokenizer, args.block_size, master, ddp)
    except DataError as e:
        fail(e)
    args.data_dir, args.tokenizer = data_dir, meta["tokenizer"]  # saved with the checkpoint
    cfg = model_config(args, meta["vocab_size"])  # the vocabulary is the data's
    ckpt, problem = read_checkpoint(ckpt_path, cfg, args) if args.resume else (None, None)
    if problem:
        fail(problem)
    if master:
        print(f"data: {data_dir} ({meta['source'][:80]}), {meta['train_tokens']:,} train tokens, "
              f"{meta['tokenizer']} tokens (vocabulary {meta['vocab_size']:,}, padded to {cfg.vocab_size:,})")
        if device_type != "cuda" and args.size not in ("tiny", "cpu"):
            print(f"note: {args.size} trains slowly without a GPU (step 1's time and this run's ETA are printed "
                  "below); for a first run in minutes try --size tiny, or --size cpu --tokenizer bytes --input FILE")
    return data_dir, cfg, ckpt, autocast_context(device_type, args.dtype, args.param_dtype), wandb


def main(argv=None):
    args = get_args(argv)
    ddp = "RANK" in os.environ  # launched by torchrun
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    master = rank == 0
    if (msg := check_args(args, model_config(args), world_size)):
        fail(msg)
    if args.plan:  # needs no data, no checkpoint and no GPU
        print_plan(plan_memory(args, torch.device(args.device if args.device != "auto" else "cuda").type))
        return
    data_dir, cfg, ckpt, ctx, wandb = prepare_run(args, ddp, master)

    # The model and optimizer, restored from the checkpoint when resuming.
    torch.manual_seed(args.seed)
    model = build_model(cfg, args.param_dtype).to(args.device)
    if master:
        print(f"model {args.size}: {model.num_params():,} parameters, {cfg}")
    optimizer = build_optimizer(model, args, verbose=master)
    gen = torch.Generator().manual_seed(args.seed)  # batch sampling; the same stream on every DDP rank
    start, log = restore(ckpt, model, optimizer, gen) if ckpt is not None else (0, [])
    if ckpt is not None and master:
        print(f"resumed from {os.path.join(args.out_dir, 'ckpt.pt')} at step {start}")
    saved_wandb_id = ckpt["args"].get("wandb_id") if ckpt is not None else None
    del ckpt
    if args.per_layer:
        attach_per_layer_updates(model, optimizer, args.grad_accum)
    raw_model = model  # what is saved and evaluated: never the compiled or DDP-wrapped one
    if args.compile:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        cuda = torch.device(args.device).type == "cuda"
        model = DDP(model, device_ids=[torch.device(args.device).index] if cuda else None)
    os.makedirs(args.out_dir, exist_ok=True)
    if master:  # one run per folder: a second one would write the same files
        try:
            atexit.register(take_lock(args.out_dir))  # released on every exit but SIGKILL (then taken over later)
        except WriteError as e:
            fail(e)
    send = start_wandb(wandb, args.wandb, args, saved_wandb_id) if wandb else None  # after the lock: one run
    run = Run(args, cfg, raw_model, optimizer, gen, start, log, send, master, ddp,
              tokens_per_step=args.batch_size * args.block_size * args.grad_accum * world_size)
    next_batch = lambda: get_batch(data_dir, "train", args.batch_size, args.block_size, args.device, gen,
                                   rank=rank, world_size=world_size)

    # The training loop: evaluate -> lr -> forward/backward -> clip and step -> log.
    try:
        for it in range(start, args.steps + 1):
            if ddp and ddp_stop(run.ctrl_c.presses > 0, raw_model, it, it % args.eval_interval == 0, args.device,
                                master):
                raise KeyboardInterrupt  # every rank stops at the same step
            if master and (it % args.eval_interval == 0 or it == args.steps):
                run.evaluate(it, data_dir, ctx)  # val loss -> log, checkpoint, loss.png
            if it == args.steps:
                break
            lr = get_lr(it, args.lr, args.min_lr, args.warmup_steps, args.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()  # the training step only: evals and checkpoints are not tokens/s
            # per_layer: the last micro-batch's backward updates the weights, so a signal waits from there on
            with run.ctrl_c.holding(args.per_layer) as hold:
                loss = forward_backward(model, next_batch, args.grad_accum, ctx, ddp, hold).item()
                if not math.isfinite(loss):
                    run.stop_nonfinite(f"loss is {loss}", it)
                with run.ctrl_c.wait():  # the update and the record that it happened, as one
                    norm = optimizer_step(model, optimizer, args.grad_clip, args.per_layer)
                    run.stepped(it, t0, loss, lr, norm)
        if master:
            run.finish(data_dir, ctx)
    except WriteError as e:  # a full disk, a folder gone read-only, ...: the last complete files are kept
        fail(e)
    except KeyboardInterrupt:
        run.interrupted()
    if ddp:  # together: a rank that tears gloo down while rank 0 still evaluates can abort at exit (SIGABRT)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before training started (data preparation, model build): nothing to save
        print("\ntrain.py: interrupted before training started; nothing was written", file=sys.stderr)
        sys.exit(130)
