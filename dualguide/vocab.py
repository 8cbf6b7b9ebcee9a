"""CLIP-style byte-level BPE vocabularies built by the project: every byte, so any text tokenizes,
plus chosen words as single tokens.

BPE applies merges by rank across all words, so each word gets the merges that BPE, run with the
merges made so far, still needs; a merge added later has a lower rank and never splits a word already
made one token (a per-word chain of merges would let "r i" from "right" split "triangle").
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Tuple

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def byte_alphabet() -> List[str]:
    """The 256 printable characters that byte-level BPE uses for the 256 byte values (GPT-2 / CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    mapping = dict(zip(printable, codes))
    return [chr(mapping[byte]) for byte in range(256)]


def bpe(word: str, ranks: Dict[Tuple[str, str], int]) -> List[str]:
    """The pieces BPE makes of ``word`` (with CLIP's ``</w>`` end marker) under merge ``ranks``."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def word_vocabulary(words: Iterable[str]) -> Tuple[Dict[str, int], List[str]]:
    """``(vocab, merges)``: every byte, plus each of ``words`` (lower-case ASCII) as a single token."""
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    ranks: Dict[Tuple[str, str], int] = {}
    for word in sorted(set(words)):
        pieces = bpe(word, ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            tokens.append(pieces[0] + pieces[1])
            pieces = bpe(word, ranks)
    tokens = list(dict.fromkeys(tokens)) + list(SPECIAL_TOKENS)
    return {token: index for index, token in enumerate(tokens)}, [f"{a} {b}" for a, b in ranks]


def write_tokenizer_files(folder: str, words: Iterable[str] = (), model_max_length: int = 77) -> None:
    """``vocab.json``, ``merges.txt`` and the config that ``CLIPTokenizer.from_pretrained`` reads (eos pads)."""
    vocab, merges = word_vocabulary(words)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    bos, eos = SPECIAL_TOKENS
    config = {"model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer", "bos_token": bos,
              "eos_token": eos, "unk_token": eos, "pad_token": eos}  # fmt: skip
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
