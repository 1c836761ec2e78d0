"""
A Llama written out in one file (torch only): RMSNorm, rotary position embeddings (RoPE), SwiGLU MLP,
causal self-attention with F.scaled_dot_product_attention.

    from llama import Llama, LlamaConfig, PRESETS
    model = Llama(LlamaConfig(**PRESETS["125M"]))
    _, loss = model(idx, targets)             # idx, targets: (B, seq_len) int64; no logits (see loss_chunk)
    logits, _ = model(idx)                    # (B, seq_len, vocab)

Sizes are those of the GaLore paper's Llama runs (arXiv 2403.03507, Table 9) with the GPT-2 vocabulary
(50257 tokens, padded to 50304, a multiple of 64, for faster matmuls). The input embedding and the output head
share one matrix (tied), which keeps the parameter counts near the presets' names with this large vocabulary:
60M -> 51M, 125M -> 124M, 350M -> 354M, 1B -> 1.31B, 3B -> 3.38B, 7B -> 6.68B (untied would be 77M, 162M,
405M, 1.41B, 3.54B, 6.89B). 3B and 7B are for memory planning (train.py --plan) and large GPUs.
References: Touvron et al. 2023 (Llama), Su et al. 2021 (RoPE), Shazeer 2020 (SwiGLU); nanoGPT's model.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class LlamaConfig:
    vocab_size: int = 50304      # GPT-2's 50257 padded up to a multiple of 64
    dim: int = 768               # model width C
    n_layers: int = 12
    n_heads: int = 12            # head size = dim // n_heads
    hidden_dim: int = 2048       # SwiGLU inner width (the paper's presets)
    block_size: int = 1024       # longest sequence the RoPE tables cover
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    loss_chunk: int = 1024       # tokens per chunk of the output head + loss when targets are given; 0 = all at
                                 # once (and the logits returned with the loss)


PRESETS = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=176, block_size=256),  # for CPU tests
    # A CPU-sized model for byte-level text (data.py --tokenizer bytes): 3.25M parameters, 97% of them in the
    # attention and MLP matrices that GaLore projects (with GPT-2's vocabulary it has 16M, mostly embedding).
    "cpu": dict(dim=256, n_layers=4, n_heads=4, hidden_dim=688, block_size=256),
    "60M": dict(dim=512, n_layers=8, n_heads=8, hidden_dim=1376),
    "125M": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=2048),
    "350M": dict(dim=1024, n_layers=24, n_heads=16, hidden_dim=2736),
    "1B": dict(dim=2048, n_layers=24, n_heads=32, hidden_dim=5461),
    "3B": dict(dim=3200, n_layers=26, n_heads=32, hidden_dim=8640),   # OpenLLaMA-3B's shape
    "7B": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008),  # the paper's 7B (Llama 7B's shape)
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # In fp32 whatever the input dtype: the mean of squares loses too much in bf16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim, seq_len, theta):
    """cos, sin of the rotation angles, each (seq_len, head_dim // 2): position t, pair i -> t * theta^(-2i/hd)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)                # (seq_len, hd/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate x (B, seq_len, n_heads, hd) pairwise. Pairing convention: interleaved, as in Meta's Llama code,
    i.e. (x[2i], x[2i+1]) is the complex number x[2i] + j x[2i+1], multiplied by exp(j * angle_i)."""
    seq_len = x.shape[1]
    cos, sin = cos[:seq_len, None, :], sin[:seq_len, None, :]  # (seq_len, 1, hd/2), broadcast over heads
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]                       # real and imaginary parts, (B, T, nh, hd/2)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, T, nh, hd/2, 2)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        # Four separate matrices (not one fused qkv) so that each gets its own GaLore subspace.
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = self.wk(x).view(B, T, self.n_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))         # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))       # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))          # SwiGLU: (B, T, C) -> (B, T, H) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)  # pre-norm residual blocks
        return x + self.mlp(self.mlp_norm(x))


class ChunkedHeadLoss(torch.autograd.Function):
    """F.cross_entropy(x @ weight^T, targets) (the mean over targets that are not -100), computed `chunk` rows
    at a time, with its gradient computed in the same pass: the (N, vocab) logits never exist at once, and no
    chunk is recomputed in backward (checkpointing each chunk would cost a third head matmul, +10% of a 125M
    step). The same loss and gradients as the whole-logits path up to summation order in fp32; with bf16 weights
    the head's gradient is summed in bf16, as close to fp32 as the whole-logits path's (both tested). Runs under
    autocast like the layers around it: the matmuls in bf16, the softmax in fp32."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk, grad_enabled, handoff=None):  # x (N, C), weight (vocab, C), targets (N)
        # Gradients only for a loss that backward will see (not in an eval under torch.no_grad()).
        need_x, need_w = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if need_x else None                                   # (N, C)
        grad_w = None  # (vocab, C), in the weight's dtype, from the first chunk on (see below)
        for i in range(0, len(x), chunk):
            xc, yc = x[i:i + chunk], targets[i:i + chunk]       # (n, C), (n,)
            z = F.linear(xc, weight)                            # (n, vocab) logits, bf16 under autocast
            dtype, z = z.dtype, z.float()                       # fp32 for the softmax (the bf16 logits freed)
            lse = torch.logsumexp(z, dim=-1, keepdim=True)      # (n, 1)
            keep = (yc != -100).unsqueeze(1)                    # (n, 1): -100 is F.cross_entropy's ignore_index
            y = yc.clamp(min=0).unsqueeze(1)                    # (n, 1)
            total += ((lse - z.gather(1, y)) * keep).sum()      # cross-entropy: logsumexp - the target's logit
            if not (need_x or need_w):
                continue
            # d(sum of the chunk's losses)/d logits = softmax - onehot(target), in place of z: (n, vocab) fp32
            d = z.sub_(lse).exp_().scatter_add_(1, y, -torch.ones_like(lse)).mul_(keep).to(dtype)
            del z  # from here one (n, vocab) tensor at a time: d, then the (vocab, C) product
            if need_x:
                grad_x[i:i + chunk] = d @ weight                # (n, vocab) @ (vocab, C) -> (n, C)
            if need_w:
                g = d.mT @ xc                                   # (vocab, n) @ (n, C) -> (vocab, C)
                # The sum in the weight's dtype, started from the first chunk's product: with bf16 weights and one
                # chunk (batch 1 x 1024) there is no second (vocab, C) tensor at all (206 MB at 1B); with several,
                # bf16 sums are rounded at each chunk, as close to fp32 as the whole-logits gradient (tested).
                grad_w = g.to(weight.dtype) if grad_w is None else grad_w.add_(g)
                del g  # before the next chunk's product: one (vocab, C) tensor next to grad_w, not two
        n = (targets != -100).sum()
        # Kept on ctx (they are neither inputs nor outputs) rather than saved: backward scales them in place and
        # drops them, so no second copy of the head's gradient is ever made.
        ctx.grads, ctx.n, ctx.handoff = (grad_x, grad_w), n, handoff
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("ChunkedHeadLoss: a second backward through the same loss (retain_graph=True) is not "
                               "supported; compute the loss again, or build the model with loss_chunk=0")
        (grad_x, grad_w), ctx.grads = ctx.grads, None
        scale = grad_loss / ctx.n  # the mean's 1/N and whatever scaled the loss after (e.g. 1 / grad_accum)
        grad_w = None if grad_w is None else grad_w.mul_(scale)
        if ctx.handoff is not None:  # a tied weight: TiedEmbedding's backward adds to it and returns the sum
            ctx.handoff["grad_w"], grad_w = grad_w, None
        return None if grad_x is None else grad_x.mul_(scale), grad_w, None, None, None, None


class TiedEmbedding(torch.autograd.Function):
    """F.embedding(idx, weight) for a weight that is also the output head (tied), with the head's loss computed
    by ChunkedHeadLoss. Autograd would hold the weight's two gradients until the last node of backward, the
    lookup, and then add them into a third tensor: three (vocab, C) tensors at the end of backward (3 x 206 MB at
    1B in bf16, the peak of a per-layer run). Here the head's gradient is handed over (through `handoff`, a dict
    both calls share) and the lookup's rows are added into it in place: one (vocab, C) gradient at a time."""

    @staticmethod
    def forward(ctx, idx, weight, handoff):  # idx (B, T) int64, weight (vocab, C) -> (B, T, C)
        ctx.save_for_backward(idx)
        ctx.handoff, ctx.weight = handoff, (weight.shape, weight.dtype, weight.device)
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad_out):  # (B, T, C)
        (idx,) = ctx.saved_tensors
        grad_w = ctx.handoff.pop("grad_w", None)  # the head's, scaled; None if the loss did not reach it
        if grad_w is None:
            shape, dtype, device = ctx.weight
            grad_w = torch.zeros(shape, dtype=dtype, device=device)
        # Row idx[t] += grad_out[t]. (On CUDA index_add_ sums repeated ids in no fixed order, as the embedding's
        # own backward does not: the last bits of the weight's gradient can change from run to run.)
        grad_w.index_add_(0, idx.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1]).to(grad_w.dtype))
        return None, grad_w, None


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.dim % cfg.n_heads or (cfg.dim // cfg.n_heads) % 2:
            raise ValueError(f"dim {cfg.dim} must be n_heads ({cfg.n_heads}) x an even head size (RoPE rotates pairs)")
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.output.weight = self.tok_emb.weight  # tied: one (vocab, dim) matrix, trained full-rank by GaLore
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.block_size, cfg.rope_theta)
        # Not saved in checkpoints (derived from the config). They stay fp32 even if the weights are cast
        # to bf16 parameter by parameter (train.py --param_dtype bf16).
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Init as GPT-2/nanoGPT: N(0, 0.02), and the matrices that write into the residual stream (wo, w2)
        # scaled by 1/sqrt(2 n_layers) so the residual's variance does not grow with depth.
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied matrix counts once

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:  # the RoPE tables stop there
            raise ValueError(f"a sequence of {T} tokens is longer than block_size {self.config.block_size}: crop it "
                             "(generate() does) or build the model with a larger block_size")
        chunk = self.config.loss_chunk
        # The chunked loss of a tied head hands its gradient to the lookup (TiedEmbedding): two copies fewer. Not
        # under torch.compile, which traces both backwards without the dict that passes the gradient between them.
        handoff = {} if (targets is not None and chunk and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                         and self.output.weight is self.tok_emb.weight) else None
        x = self.tok_emb(idx) if handoff is None else TiedEmbedding.apply(idx, self.tok_emb.weight, handoff)  # (B,T,C)
        for block in self.layers:
            if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only the block's input; its activations are recomputed during backward.
                x = checkpoint(block, x, self.rope_cos, self.rope_sin, use_reentrant=False)
            else:
                x = block(x, self.rope_cos, self.rope_sin)
        x = self.norm(x)                                        # (B, T, C)
        if targets is None or not chunk:
            logits = self.output(x)                             # (B, T, vocab)
            loss = None if targets is None else F.cross_entropy(logits.float().view(-1, logits.size(-1)),
                                                                targets.reshape(-1))
            return logits, loss
        # The loss in chunks of `chunk` tokens, and no logits returned. The whole (B*T, vocab) logits are the
        # largest tensors of a step (8 x 1024 tokens x 50,304 = 412M numbers, held in bf16, again in fp32 for the
        # loss and again as their gradient: ~5 GB at 125M). ChunkedHeadLoss holds one chunk's at a time, and even
        # on a single chunk (batch 1 x 1024) it holds one (tokens, vocab) tensor where F.cross_entropy holds three.
        loss = ChunkedHeadLoss.apply(x.reshape(B * T, -1), self.output.weight, targets.reshape(B * T), chunk,
                                     torch.is_grad_enabled(), handoff)
        return None, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample max_new_tokens after idx (B, T); no KV cache, so each token re-reads the whole context."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :].float() / max(temperature, 1e-6)  # (B, vocab)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, nxt), dim=1)
        return idx
