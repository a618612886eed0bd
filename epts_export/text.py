"""Text sources: what calibration and evaluation read their tokens from.

    path/to/file.txt | path/to/folder   plain UTF-8 text (folder: every *.txt / *.md inside, sorted)
    hf:NAME[:CONFIG[:SPLIT]]            a `datasets` dataset; `hf:c4` and `hf:wikitext2` are the papers' sets

``read_text_source`` reads one, refusing what is not UTF-8 text with the offset of its first bad
byte; ``tokenize_text`` tokenizes it whole; ``window_samples`` draws non-overlapping windows.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UserError, one_line

# Short names for the datasets the Wanda/SparseGPT papers calibrate and evaluate on.
DATASET_ALIASES = {
    "c4": ("allenai/c4", None, "train", {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}}),
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", {}),
}
TEXT_SUFFIXES = (".txt", ".md", ".text")


MAX_TEXT_BYTES = int(os.environ.get("EPTS_MAX_TEXT_MB", 512)) * 2**20  # tokenized whole: about 4x this in memory


def _read_utf8(path: Path, what: str, budget: int | None = None) -> str:
    """A text file's contents; UserError with the offset of the first byte that is not UTF-8 (a binary
    file decoded with replacement characters would calibrate or evaluate on garbage), for NUL
    bytes, and for more than ``budget`` bytes (read whole and tokenized whole)."""
    size = path.stat().st_size
    if size > (MAX_TEXT_BYTES if budget is None else budget):
        raise UserError(f"{what} {path} is {size / 2**20:.0f} MiB; at most {MAX_TEXT_BYTES // 2**20} MiB of text is read "
                        "(it is tokenized whole): pass a sample of it (set EPTS_MAX_TEXT_MB to raise the bound)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (invalid byte at offset {e.start}): pass a text file") from None
    if "\x00" in text:
        raise UserError(f"{what} {path} holds NUL bytes (offset {text.index(chr(0))}): not a text file")
    return text


def read_text_source(source: str, what: str = "calibration source") -> tuple[str, str]:
    """(text, kind) of a file, a folder or an hf: dataset; UserError when it cannot be read.
    ``what`` names the source in errors ("calibration source", "evaluation text")."""
    if source.startswith("hf:"):
        return _dataset_text(source[3:]), "hf"
    p = Path(source).expanduser()
    if p.is_file():
        return _read_utf8(p, what), "file"
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"{what} folder {p} has no text files ({', '.join(TEXT_SUFFIXES)})")
        parts, left = [], MAX_TEXT_BYTES
        for f in files:  # the bound holds for the folder as a whole
            parts.append(_read_utf8(f, what, left))
            left -= f.stat().st_size
        return "\n\n".join(parts), "folder"
    if p.exists():
        raise UserError(f"{what} {source} is not a regular file or a folder (a FIFO or a device?): pass a text file")
    raise UserError(f"{what} not found: {source} (a text file, a folder, hf:NAME[:CONFIG[:SPLIT]]"
                    + (" or 'self')" if what == "calibration source" else ")"))


def _dataset_text(spec: str) -> str:
    parts = spec.split(":")
    name = parts[0]
    try:
        import datasets  # optional: only this source needs it
    except ImportError:
        raise UserError("calibration source hf:... needs the `datasets` package: pip install datasets") from None
    if name in DATASET_ALIASES:
        path, config, split, extra = DATASET_ALIASES[name]
    else:
        path, config, split, extra = name, None, "train", {}
    if len(parts) > 1 and parts[1]:
        config = parts[1]
    if len(parts) > 2 and parts[2]:
        split = parts[2]
    try:
        ds = datasets.load_dataset(path, config, split=split, **extra)
    except Exception as e:  # offline, unknown name, bad split: all user-fixable
        raise UserError(f"could not load dataset hf:{spec}: {one_line(e)}; use a local text file or --calib self") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    rows, size = [], 0
    for t in ds[column]:  # the first MAX_TEXT_BYTES of the split: more is never needed whole
        if t:
            rows.append(t)
            size += len(t)
            if size >= MAX_TEXT_BYTES:
                break
    return "\n\n".join(rows)


def window_samples(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    """Pick ``nsamples`` distinct non-overlapping ``seqlen`` windows of a 1-D token tensor.

    The cut starts at a random offset, then windows are chosen without replacement. Returns
    (nsamples, seqlen) int64.
    """
    total = ids.numel()
    need = nsamples * seqlen
    if total < need:
        raise UserError(
            f"{what} has {total} tokens, too short for --nsamples {nsamples} x --seqlen {seqlen} = {need} tokens; "
            "lower --nsamples/--seqlen or give more text"
        )
    gen = torch.Generator().manual_seed(seed)
    n_windows = total // seqlen
    offset = int(torch.randint(0, total - n_windows * seqlen + 1, (1,), generator=gen))
    pick = torch.randperm(n_windows, generator=gen)[:nsamples].sort().values
    windows = ids[offset: offset + n_windows * seqlen].view(n_windows, seqlen)
    return windows[pick].clone()


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once, without special tokens: (tokens,) int64."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)
