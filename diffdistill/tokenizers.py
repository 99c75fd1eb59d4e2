"""A CLIP tokenizer built offline from the BPE table that open_clip ships.

Stable Diffusion's ``CLIPTokenizer`` needs ``vocab.json`` + ``merges.txt``, normally downloaded from a
hub. open_clip bundles the very same BPE table (``bpe_simple_vocab_16e6.txt.gz``); the Hugging Face
vocabulary is derived from it exactly: 256 byte symbols, the same 256 with the end-of-word marker,
one token per merge, then the two special tokens. Token ids match open_clip's own tokenizer.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

VOCAB_SIZE = 49408
MAX_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_clip_vocab(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` derived from open_clip's bundled BPE into ``out_dir``."""
    from open_clip.tokenizer import default_bpe

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    vocab_file, merges_file = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_file, merges_file


def build_clip_tokenizer(work_dir: str | Path, max_length: int = MAX_LENGTH):
    """A ``transformers.CLIPTokenizer`` identical in ids to SD1.5's, built without any download."""
    from transformers import CLIPTokenizer

    write_clip_vocab(work_dir)
    # Loading from the folder (vocab.json + merges.txt) works with both transformers 4 and 5,
    # whose CLIPTokenizer constructors take different arguments.
    return CLIPTokenizer.from_pretrained(str(work_dir), model_max_length=max_length)
