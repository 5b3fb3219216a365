"""The `text` data kind of task language-modeling: unlabelled text, tokenised and packed into blocks of token ids.

data.text.train / data.text.val each name a plain-text file, or a folder whose files ending in one of
data.text.extensions are read recursively in sorted order of their relative paths (hidden files and folders, whose
names start with a dot, are skipped; empty files are skipped). Every file is one document, decoded as UTF-8 (a file
that is not UTF-8 text is an error naming it: re-encode it or take it out of the folder). The documents are tokenised
with the model's tokenizer (data.text.tokenizer, else the hf:DIR folder's own; transformers' AutoTokenizer, local
files only) without special tokens, joined with the tokenizer's EOS id between consecutive documents, and the one
token stream is cut into non-overlapping blocks of data.text.block_size tokens: the ragged tail (fewer than
block_size tokens) is dropped, so every block is full and no padding is needed. Each sample is (block, block): a
causal LM's target is its own input, shifted by the task (compressor/tasks/language_modeling.py).

Tokenising runs in batches of documents through the fast (Rust) tokenizer; nothing is cached on disk.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from compressor.errors import DataError
from compressor.train.config import DataConfig

BATCH_CHARS = 1 << 20  # documents are tokenised in batches of about this many characters
SHOWN = 5  # bad files named in one error


class TokenBlocks(Dataset):
    """(N, block_size) int64 token ids packed from a corpus; sample i is (blocks[i], blocks[i])."""

    def __init__(self, blocks: torch.Tensor, source: str, *, tokens: int, documents: int,
                 tokenizer: Any = None) -> None:
        self.blocks, self.source, self.tokenizer = blocks, source, tokenizer
        self.tokens = tokens  # every token of the corpus, EOS separators included
        self.documents = documents
        self.dropped = tokens - blocks.numel()  # the ragged tail, fewer than block_size tokens

    @property
    def block_size(self) -> int:
        return int(self.blocks.shape[1])

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, index: int):
        block = self.blocks[index]
        return block, block


def corpus_files(path: Path, extensions: Sequence[str], field: str) -> list[Path]:
    """The files of a corpus: `path` itself when it is a file (whatever its suffix), else the files under the
    folder `path` whose suffix is in `extensions` (case-insensitive, "txt" meaning ".txt"), sorted by relative path, hidden ones left
    out. DataError when `path` does not exist or the folder holds no such file."""
    if path.is_file():
        return [path]
    if not path.exists():
        raise DataError(f"{field}: {path} does not exist.",
                        hint=f"Set {field} to a plain-text file, or to a folder of text files.")
    if not path.is_dir():
        raise DataError(f"{field}: {path} is neither a file nor a folder.",
                        hint=f"Set {field} to a plain-text file, or to a folder of text files.")
    wanted = {e.strip().lower() if e.strip().startswith(".") else "." + e.strip().lower() for e in extensions}
    files = []
    for candidate in path.rglob("*"):
        relative = candidate.relative_to(path)
        if (candidate.suffix.lower() in wanted and not any(part.startswith(".") for part in relative.parts)
                and candidate.is_file()):
            files.append((relative.as_posix(), candidate))
    if not files:
        raise DataError(f"{field}: the folder {path} holds no file ending in {', '.join(sorted(wanted))} "
                        "(searched recursively, hidden files and folders left out).",
                        hint="Add text files to it, or set data.text.extensions to the suffixes of its files "
                             "(e.g. ['.txt', '.py']).")
    return [candidate for _, candidate in sorted(files)]


def _decode(file: Path) -> tuple[Optional[str], Optional[str]]:
    """(the text of `file`, None) or (None, why it is not UTF-8 text)."""
    try:
        raw = file.read_bytes()
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    nul = raw.find(b"\x00")
    if nul >= 0:
        return None, f"is binary, not text (a NUL byte at offset {nul})"
    try:
        return raw.decode("utf-8-sig"), None  # -sig: an editor's byte-order mark is not text
    except UnicodeDecodeError as exc:
        return None, f"is not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x})"


def read_documents(path: Path, extensions: Sequence[str], field: str) -> list[str]:
    """The text of every corpus file with text in it (see corpus_files); DataError naming the file(s) that are not
    UTF-8 text, an empty file, or a folder whose files are all empty."""
    files = corpus_files(path, extensions, field)
    documents, bad = [], []
    for file in files:
        text, problem = _decode(file)
        if problem is not None:
            bad.append(f"{file} {problem}")
        elif text.strip():
            documents.append(text)
    if bad:
        shown = "; ".join(bad[:SHOWN]) + (f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")
        fix = ("Save the file as UTF-8 text (e.g. iconv -f latin1 -t utf-8)." if path.is_file() else
               "Re-encode those files as UTF-8 or move them out of the folder, or narrow data.text.extensions.")
        raise DataError(f"{field}: {shown}.", hint=f"A language-modeling corpus is UTF-8 text. {fix}")
    if not documents:
        what = f"{path} is empty" if path.is_file() else (f"all {len(files)} file(s) ending in "
                                                           f"{', '.join(sorted(set(extensions)))} under {path} are empty")
        raise DataError(f"{field}: {what} (no text to train or evaluate on).",
                        hint=f"Point {field} at a file or folder that holds text.")
    return documents


def tokenize_documents(tokenizer: Any, documents: Sequence[str]) -> list[np.ndarray]:
    """Each document's token ids (int64, no special tokens), tokenised in batches of about BATCH_CHARS characters
    (the fast tokenizer encodes a batch in parallel)."""
    ids: list[np.ndarray] = []
    start = 0
    while start < len(documents):
        end, chars = start, 0
        while end < len(documents) and (end == start or chars + len(documents[end]) <= BATCH_CHARS):
            chars += len(documents[end])
            end += 1
        encoded = tokenizer(list(documents[start:end]), add_special_tokens=False, return_attention_mask=False,
                            return_token_type_ids=False, verbose=False)["input_ids"]
        ids += [np.asarray(e, dtype=np.int64) for e in encoded]
        start = end
    return ids


def pack_blocks(documents: Sequence[np.ndarray], separator: Optional[int], block_size: int) -> tuple[torch.Tensor, int]:
    """(the token stream cut into (N, block_size) blocks, its length): the documents joined with `separator`
    between consecutive ones (none for a single document), the ragged tail dropped."""
    pieces: list[np.ndarray] = []
    for i, doc in enumerate(documents):
        if i and separator is not None:
            pieces.append(np.asarray([separator], dtype=np.int64))
        pieces.append(doc)
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    count = len(stream) // block_size
    blocks = torch.from_numpy(np.ascontiguousarray(stream[: count * block_size]).reshape(count, block_size))
    return blocks, int(len(stream))


def corpus_blocks(path: Path, tokenizer: Any, block_size: int, extensions: Sequence[str], field: str) -> TokenBlocks:
    """One split of a corpus (a file or a folder) as TokenBlocks; DataError when it is missing, empty, not text, or
    shorter than one block."""
    documents = read_documents(path, extensions, field)
    ids = tokenize_documents(tokenizer, documents)
    separator = getattr(tokenizer, "eos_token_id", None)
    if separator is None and len(ids) > 1:
        raise DataError(f"{field}: the tokenizer has no EOS token to separate the {len(ids)} documents of {path}.",
                        hint="Set data.text.tokenizer to a causal LM's tokenizer (its eos_token), or give the corpus "
                             "as one file.")
    blocks, tokens = pack_blocks(ids, None if separator is None else int(separator), block_size)
    if len(blocks) == 0:
        raise DataError(f"{field}: {path} holds {tokens} tokens, fewer than one block of data.text.block_size "
                        f"{block_size} tokens.",
                        hint=f"Give more text, or set data.text.block_size (and model.input_shape) to at most "
                             f"{tokens}." if tokens > 1 else "Give more text.")
    return TokenBlocks(blocks, str(path), tokens=tokens, documents=len(ids), tokenizer=tokenizer)


def corpus_datasets(cfg: DataConfig, model_ref: Optional[str]) -> tuple[TokenBlocks, TokenBlocks]:
    """(train, val) TokenBlocks of data.text.train / data.text.val, tokenised with data.text.tokenizer or the
    hf:DIR model's tokenizer."""
    from compressor.train.text import load_tokenizer

    text = cfg.text
    tokenizer = load_tokenizer(cfg, model_ref)
    splits = [corpus_blocks(Path(getattr(text, split)).expanduser(), tokenizer, text.block_size, text.extensions,
                            f"data.text.{split}") for split in ("train", "val")]
    return splits[0], splits[1]
