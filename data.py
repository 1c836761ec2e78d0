"""
WikiText-103 -> GPT-2 tokens in uint16 memmaps, and random batches from them.

    python data.py                                  # download wikitext-103-raw-v1 and tokenize (~120M tokens)
    python data.py --input a.txt b.txt              # your own text (offline) -> data/a_gpt2
    python data.py --input a.txt --tokenizer bytes  # UTF-8 bytes as tokens (vocabulary 257) -> data/a_bytes

Writes, in --data_dir: train.bin, val.bin, test.bin (raw uint16 token ids, read with np.memmap) and meta.json
(token counts, tokenizer, vocab_size, source). The default folder is data/wikitext103 for WikiText and one
named after the first input file for your own text, so your text never lands in the WikiText folder. The
folder is built under a temporary name and renamed when complete: a folder with meta.json is complete, and a
second run then does nothing. Documents are separated by the tokenizer's end-of-text token (GPT-2: 50256).
"""

import argparse
import json
import os
import re
import shutil
import sys
import time

import numpy as np
import torch

SPLITS = ("train", "val", "test")
DTYPE = np.uint16
WIKITEXT = "wikitext-103-raw-v1"


class DataError(Exception):
    """A problem the user can fix (bad input, missing data); printed as one line, no traceback."""


class ByteEncoding:
    """Tokens are the UTF-8 bytes of the text (ids 0-255) plus an end-of-text id 256: no tokenizer files, no
    download, and a vocabulary of 257, so the embedding is a small part of a small model (nanoGPT's
    character-level Shakespeare plays the same role). The same methods as a tiktoken Encoding, as far as
    data.py and train.py use them."""
    name, eot_token, n_vocab, max_token_value = "bytes", 256, 257, 256

    def encode_ordinary_batch(self, texts, num_threads=1):
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def get_encoding(name="gpt2"):
    if name == "bytes":
        return ByteEncoding()
    import tiktoken  # imported here so that get_batch users do not need it
    if name not in tiktoken.list_encoding_names():
        raise DataError(f"unknown tokenizer {name!r}: use bytes or one of {', '.join(tiktoken.list_encoding_names())}")
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


def default_data_dir(inputs=None, tokenizer="gpt2"):
    """data/wikitext103 for WikiText (GPT-2 tokens), else a folder of its own: data/<first input's name>_<tokenizer>."""
    if not inputs:
        return "data/wikitext103" + ("" if tokenizer == "gpt2" else f"_{tokenizer}")
    return os.path.join("data", f"{os.path.splitext(os.path.basename(inputs[0]))[0]}_{tokenizer}")


def load_meta(data_dir):
    """The meta.json of a complete data folder; None if the folder holds no data yet. A folder that holds
    some of the files, or files whose sizes disagree with meta.json, is a DataError: it is reported, never
    rebuilt over (it may be a copy the user made by hand)."""
    names = ["meta.json"] + [f"{s}.bin" for s in SPLITS]
    present = [n for n in names if os.path.exists(os.path.join(data_dir, n))]
    if not present:
        return None
    fix = f"delete {data_dir} to rebuild it, or copy a complete one (train.bin, val.bin, test.bin, meta.json)"
    if "meta.json" not in present:
        raise DataError(f"{data_dir} holds {', '.join(present)} but no meta.json, so it is incomplete: {fix}")
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
        sizes = {s: meta[f"{s}_tokens"] * np.dtype(DTYPE).itemsize for s in SPLITS}
        meta["vocab_size"], meta["tokenizer"], meta["source"]  # KeyError if a field is missing
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{data_dir}/meta.json is damaged ({type(e).__name__}): {fix}") from None
    for s in SPLITS:
        path = os.path.join(data_dir, f"{s}.bin")
        if not os.path.exists(path) or os.path.getsize(path) != sizes[s]:
            got = f"{os.path.getsize(path):,} bytes" if os.path.exists(path) else "missing"
            raise DataError(f"{path} is {got} but meta.json says {sizes[s]:,} (truncated or replaced): {fix}")
    return meta


def check_token_ids(data_dir, vocab_size):
    """Every token id of every split must index the model's embedding (of vocab_size rows)."""
    for s in SPLITS:
        data = np.memmap(os.path.join(data_dir, f"{s}.bin"), dtype=DTYPE, mode="r")
        if len(data) and (top := int(data.max())) >= vocab_size:
            raise DataError(f"{data_dir}/{s}.bin holds token id {top}, but the vocabulary has {vocab_size} ids: "
                            "the folder's meta.json does not describe its .bin files; rebuild it with data.py")


def folder_problem(folder, flag):
    """Why `folder` cannot be written (or created), as one line; None if it can. Creates nothing."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):  # the nearest existing ancestor must let us create what is missing
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return f"{flag} {folder}: {path} is a file, not a folder; choose another {flag}"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{flag} {folder}: {path} cannot be written (read-only or no permission); choose another {flag}"
    return None


def prepare(data_dir, inputs=None, tokenizer="gpt2", num_threads=None):
    """Build train/val/test.bin and meta.json in data_dir unless complete files are there. Returns the meta.
    inputs=None builds WikiText-103; a complete folder must hold what was asked for (source and tokenizer)."""
    source = WIKITEXT if not inputs else "files: " + " ".join(os.path.abspath(p) for p in inputs)
    # Your files' total size, kept in meta.json: an edited file (same path, other text) is not taken for the same data
    input_bytes = sum(os.path.getsize(p) for p in inputs if os.path.isfile(p)) if inputs else None
    if (meta := load_meta(data_dir)) is not None:
        if (meta["source"], meta["tokenizer"]) != (source, tokenizer):
            raise DataError(f"{data_dir} already holds {meta['source']} ({meta['tokenizer']} tokens), not {source} "
                            f"({tokenizer} tokens); choose another --data_dir (nothing was changed)")
        if meta.get("input_bytes", input_bytes) != input_bytes:
            raise DataError(f"{data_dir} was built from {meta['input_bytes']:,} bytes of --input, which now hold "
                            f"{input_bytes:,}: delete {data_dir} to rebuild it from the new text (nothing was changed)")
        print(f"{data_dir}: complete ({meta['train_tokens']:,} train tokens), nothing to do")
        return meta
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir} is a file, not a folder: choose a folder")
    if (msg := folder_problem(data_dir, "--data_dir")):  # before the download and the tokenizing, not after
        raise DataError(msg)
    if os.path.isdir(data_dir) and (other := sorted(os.listdir(data_dir))):
        raise DataError(f"{data_dir} holds other files ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}) "
                        "and no data: choose a new or empty --data_dir (nothing was changed)")
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
    meta = dict(source=source, tokenizer=tokenizer, dtype="uint16", vocab_size=enc.n_vocab, eot=enc.eot_token,
                **{f"{s}_tokens": int(len(arr)) for s, arr in splits.items()}, input_bytes=input_bytes)
    # Everything goes into a temporary folder that is renamed when complete (atomic on POSIX): an interrupted
    # run leaves data_dir as it was, never a half-built folder that a later run would take for data.
    tmp = data_dir.rstrip("/\\") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an interrupted run
    try:
        os.makedirs(tmp)
        for s, arr in splits.items():
            arr.tofile(os.path.join(tmp, f"{s}.bin"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.isdir(data_dir):
            os.rmdir(data_dir)  # empty (load_meta found no data files); anything else in it makes this an error
        os.replace(tmp, data_dir)
    except OSError as e:  # a full disk, a read-only or vanished folder: one line, and no half-built folder left
        shutil.rmtree(tmp, ignore_errors=True)
        need = sum(arr.nbytes for arr in splits.values())
        raise DataError(f"could not write {data_dir} ({e.strerror or e}; it needs {need / 1e6:,.1f} MB): nothing "
                        "was written; free some space or choose another --data_dir") from None
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


def iter_windows(data_dir, split, batch_size, block_size, device="cpu"):
    """The whole split as consecutive non-overlapping windows, batch_size at a time: x, y of shape
    (<= batch_size, block_size); every token but the last few (< block_size + 1) is predicted exactly once."""
    data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=DTYPE, mode="r")
    n = (len(data) - 1) // block_size
    for start in range(0, n, batch_size):
        rows = range(start, min(n, start + batch_size))
        x = torch.from_numpy(np.stack([data[r * block_size:(r + 1) * block_size].astype(np.int64) for r in rows]))
        y = torch.from_numpy(np.stack([data[r * block_size + 1:(r + 1) * block_size + 1].astype(np.int64)
                                       for r in rows]))
        yield x.to(device), y.to(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="where the .bin files and meta.json go (default: "
                        "data/wikitext103, or data/<first input>_<tokenizer> with --input)")
    parser.add_argument("--input", nargs="+", metavar="FILE", help="build from these UTF-8 text files instead")
    parser.add_argument("--tokenizer", default="gpt2",
                        help="'bytes' (UTF-8 bytes, vocabulary 257) or a tiktoken encoding name (ids must fit uint16)")
    parser.add_argument("--num_threads", type=int, default=None, help="tokenizer threads (default: all cores)")
    args = parser.parse_args()
    if args.num_threads is not None and args.num_threads < 1:
        sys.exit(f"data.py: error: --num_threads {args.num_threads} must be >= 1")
    try:
        prepare(args.data_dir or default_data_dir(args.input, args.tokenizer), args.input, args.tokenizer,
                args.num_threads)
    except DataError as e:
        sys.exit(f"data.py: error: {e}")


if __name__ == "__main__":
    main()
