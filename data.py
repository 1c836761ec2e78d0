"""
WikiText-103 -> GPT-2 tokens in uint16 memmaps, and random batches from them.

    python data.py                          # download wikitext-103-raw-v1 and tokenize (~120M tokens, minutes)
    python data.py --input a.txt b.txt      # the same files from your own text (offline)

Writes, in --data_dir (default data/wikitext103): train.bin, val.bin, test.bin (raw uint16 token ids, read
with np.memmap) and meta.json (token counts, tokenizer, source). Every file is written under a temporary
name and renamed when complete, and meta.json is written last: a folder with meta.json is complete, and a
second run then does nothing. Documents are separated by GPT-2's end-of-text token (50256).
"""

import argparse
import json
import os
import re
import sys
import time

import numpy as np
import torch

SPLITS = ("train", "val", "test")
DTYPE = np.uint16


class DataError(Exception):
    """A problem the user can fix (bad input, missing data); printed as one line, no traceback."""


def get_encoding(name="gpt2"):
    import tiktoken  # imported here so that get_batch users do not need it
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # offline and not cached: tiktoken downloads the BPE files on first use
        raise DataError(f"could not load the tiktoken encoding {name!r} ({type(e).__name__}): it is downloaded "
                        "on first use, so run once with internet access, or set TIKTOKEN_CACHE_DIR to a folder "
                        "holding its cached files") from None


def check_fits(enc, dtype=DTYPE):
    if enc.max_token_value > np.iinfo(dtype).max:
        raise DataError(f"tokenizer {enc.name!r} has token ids up to {enc.max_token_value}, which do not fit "
                        f"{np.dtype(dtype).name}; use a tokenizer with at most {np.iinfo(dtype).max + 1} tokens "
                        "(e.g. --tokenizer gpt2)")


def tokenize(docs, enc, label, num_threads):
    """Token ids of all docs, EOT after each, as one uint16 array; batched over threads, with progress."""
    chunks, n_tokens, t0, step = [], 0, time.time(), 4096
    for start in range(0, len(docs), step):
        batch = enc.encode_ordinary_batch(docs[start:start + step], num_threads=num_threads)
        for ids in batch:
            ids.append(enc.eot_token)
            chunks.append(np.array(ids, dtype=DTYPE))
            n_tokens += len(ids)
        done = min(start + step, len(docs))
        print(f"\r{label}: {done:,}/{len(docs):,} documents, {n_tokens:,} tokens, "
              f"{n_tokens / max(time.time() - t0, 1e-9) / 1e6:.1f}M tokens/s", end="", flush=True)
    print()
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=DTYPE)


def wikitext_documents(lines):
    """WikiText rows are lines; an article starts at a top-level heading ' = Title = '. Rejoin articles."""
    docs, current = [], []
    for line in lines:
        if re.match(r"^ = [^=].* = \n?$", line) and current:
            docs.append("".join(current))
            current = []
        current.append(line)
    if current:
        docs.append("".join(current))
    return [d for d in docs if d.strip()]


def read_text_files(paths):
    docs = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise DataError(f"cannot read --input {path}: {e.strerror}") from None
        if b"\x00" in raw:
            raise DataError(f"--input {path} looks binary (it contains NUL bytes); give UTF-8 text files")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"--input {path} is not UTF-8 text (bad byte at offset {e.start}); "
                            "give UTF-8 text files") from None
        if text.strip():
            docs.append(text)
    if not docs:
        raise DataError(f"--input {' '.join(paths)}: no text found; give non-empty UTF-8 text files")
    return docs


def is_complete(data_dir):
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
        return all(os.path.getsize(os.path.join(data_dir, f"{s}.bin")) == 2 * meta[f"{s}_tokens"] for s in SPLITS)
    except (OSError, ValueError, KeyError):
        return False


def write_atomic(path, write):
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)  # atomic on POSIX and Windows: the file is either old/absent or complete


def prepare(data_dir, inputs=None, tokenizer="gpt2", num_threads=None):
    """Build train/val/test.bin and meta.json in data_dir unless complete files are there. Returns the meta."""
    source = "wikitext-103-raw-v1" if not inputs else "files: " + " ".join(os.path.abspath(p) for p in inputs)
    if is_complete(data_dir):
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
        if meta["source"] != source:
            raise DataError(f"{data_dir} already holds data from {meta['source']}; choose another --data_dir "
                            "(nothing was changed)")
        print(f"{data_dir}: complete ({meta['train_tokens']:,} train tokens), nothing to do")
        return meta
    enc = get_encoding(tokenizer)
    check_fits(enc)
    num_threads = num_threads or os.cpu_count() or 1
    if inputs:
        # Your own text: the files are documents; their tokens are split 90/5/5 by position.
        tokens = tokenize(read_text_files(inputs), enc, "input", num_threads)
        n = len(tokens)
        a, b = int(0.9 * n), int(0.95 * n)
        splits = dict(train=tokens[:a], val=tokens[a:b], test=tokens[b:])
    else:
        try:
            from datasets import load_dataset
            ds = load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1")
        except Exception as e:  # offline, hub down, ...: say how to go on instead of a 50-line traceback
            raise DataError(f"could not download WikiText-103 ({type(e).__name__}: {str(e)[:200]}). Offline, "
                            f"copy a prepared folder (train.bin, val.bin, test.bin, meta.json) to {data_dir}, "
                            "or build from your own text: python data.py --input FILE... "
                            "(train.py takes --input too)") from None
        names = dict(train="train", val="validation", test="test")
        splits = {s: tokenize(wikitext_documents(ds[names[s]]["text"]), enc, s, num_threads) for s in SPLITS}
    os.makedirs(data_dir, exist_ok=True)
    for s, arr in splits.items():
        write_atomic(os.path.join(data_dir, f"{s}.bin"), arr.tofile)
    meta = dict(source=source, tokenizer=tokenizer, dtype="uint16", vocab_size=enc.n_vocab, eot=enc.eot_token,
                **{f"{s}_tokens": int(len(arr)) for s, arr in splits.items()})
    def write_meta(path):
        with open(path, "w") as f:  # closed, so flushed, before write_atomic renames it
            json.dump(meta, f, indent=1)
    write_atomic(os.path.join(data_dir, "meta.json"), write_meta)
    print(f"wrote {data_dir}: " + ", ".join(f"{s} {meta[f'{s}_tokens']:,} tokens" for s in SPLITS))
    return meta


def get_batch(data_dir, split, batch_size, block_size, device="cpu", generator=None, rank=0, world_size=1):
    """x, y: (batch_size, block_size) int64 windows at random offsets; y is x shifted by one token.
    Under data parallelism every rank draws the offsets of the whole global batch (world_size * batch_size)
    from the same seeded generator and reads only its own rows: ranks never see the same window, and the
    run equals a single process with batch world_size * batch_size (which the tests check)."""
    # Re-open the memmap every call: a long-lived np.memmap keeps growing the process's memory (nanoGPT).
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=DTYPE, mode="r")
    if len(data) <= block_size:
        raise DataError(f"the {split} split has {len(data):,} tokens, too few for --block_size {block_size}; "
                        "use a smaller --block_size or more data")
    ix = torch.randint(len(data) - block_size, (world_size * batch_size,), generator=generator)
    ix = ix[rank * batch_size:(rank + 1) * batch_size].tolist()
    x = torch.from_numpy(np.stack([data[i:i + block_size].astype(np.int64) for i in ix]))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size].astype(np.int64) for i in ix]))
    if torch.device(device).type == "cuda":
        # Pinned memory lets the copy run asynchronously while the GPU is still busy with the last step.
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="data/wikitext103", help="where the .bin files and meta.json go")
    parser.add_argument("--input", nargs="+", metavar="FILE", help="build from these UTF-8 text files instead")
    parser.add_argument("--tokenizer", default="gpt2", help="tiktoken encoding name (ids must fit uint16)")
    parser.add_argument("--num_threads", type=int, default=None, help="tokenizer threads (default: all cores)")
    args = parser.parse_args()
    try:
        prepare(args.data_dir, args.input, args.tokenizer, args.num_threads)
    except DataError as e:
        sys.exit(f"data.py: error: {e}")


if __name__ == "__main__":
    main()
