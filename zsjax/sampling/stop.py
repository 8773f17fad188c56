"""On-device stop-string detection that does not care how the tokenizer splits the string.

We build an automaton (Aho-Corasick) over the stop strings' UTF-8 bytes, then lift it to a
token-level transition table: `next_state[s, t]` is the automaton state after reading token t's
bytes from state s, and `matched[s, t]` says whether a stop string ended anywhere inside them.
A token's bytes are what it stands for in running text (`token_bytes`): a byte-level BPE piece
of half a character, or a SentencePiece piece with its leading space, each decode differently
on their own, so a stop string with such a character or space would otherwise be missed.
During decoding each row carries one int32 state; a step is two gathers. The tables cost
`states x vocab` int32 (about 1 MB per 17 states for a 49k vocabulary) and are built with numpy,
vectorised over the vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import re
import weakref
from collections import deque
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class StopTables:
    next_state: np.ndarray  # [S, V] int32
    matched: np.ndarray  # [S, V] bool


def _char_automaton(stop_strings: Sequence[str | bytes]):
    """Aho-Corasick over symbols (characters of str, or bytes): (alphabet, delta [S, A+1] with
    column A = any other symbol, accepting [S])."""
    alphabet = sorted({ch for s in stop_strings for ch in s})
    col = {ch: i for i, ch in enumerate(alphabet)}
    goto: list[dict[int, int]] = [{}]
    accepting = [False]
    for s in stop_strings:
        state = 0
        for ch in s:
            c = col[ch]
            if c not in goto[state]:
                goto.append({})
                accepting.append(False)
                goto[state][c] = len(goto) - 1
            state = goto[state][c]
        accepting[state] = True
    n, a = len(goto), len(alphabet)
    fail = [0] * n
    delta = np.zeros((n, a + 1), np.int32)  # the "other" column stays 0 (back to root)
    queue: deque[int] = deque()
    for c in range(a):
        if c in goto[0]:
            delta[0, c] = goto[0][c]
            queue.append(goto[0][c])
    while queue:
        state = queue.popleft()
        accepting[state] = accepting[state] or accepting[fail[state]]
        for c in range(a):
            if c in goto[state]:
                child = goto[state][c]
                fail[child] = delta[fail[state], c]
                delta[state, c] = child
                queue.append(child)
            else:
                delta[state, c] = delta[fail[state], c]
    return col, delta, np.array(accepting)


def build_tables(token_texts: Sequence[str | bytes], stop_strings: Sequence[str | bytes]
                 ) -> StopTables:
    """Token-level tables from each token's text and the stop strings, both str or both
    bytes (`tables_for` uses bytes)."""
    stop_strings = [s for s in stop_strings if s]
    if not stop_strings:
        raise ValueError("build_tables needs at least one non-empty stop string")
    col, delta, accepting = _char_automaton(stop_strings)
    other = delta.shape[1] - 1
    vocab = len(token_texts)
    max_len = max((len(t) for t in token_texts), default=0)
    # chars[t, j] = alphabet column of the j-th char of token t; -1 past the end.
    chars = np.full((vocab, max(max_len, 1)), -1, np.int32)
    for t, text in enumerate(token_texts):
        if text:
            chars[t, :len(text)] = [col.get(ch, other) for ch in text]
    n_states = delta.shape[0]
    next_state = np.empty((n_states, vocab), np.int32)
    matched = np.zeros((n_states, vocab), bool)
    for s in range(n_states):
        state = np.full(vocab, s, np.int32)
        hit = np.zeros(vocab, bool)
        for j in range(chars.shape[1]):
            live = chars[:, j] >= 0
            if not live.any():
                break
            stepped = delta[state, np.maximum(chars[:, j], 0)]
            state = np.where(live, stepped, state)
            hit |= live & accepting[stepped]
        next_state[s] = state
        matched[s] = hit
    return StopTables(next_state, matched)


def token_texts(tokenizer, vocab_size: int) -> list[str]:
    """The text each token id decodes to on its own (ids beyond the tokenizer give '')."""
    n = min(len(tokenizer), vocab_size)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return list(texts) + [""] * (vocab_size - n)


def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for the 256 bytes (GPT-2's table), inverted:
    printable bytes stand for themselves, the others for chr(256 + k) in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    table = {chr(b): b for b in keep}
    table.update({chr(256 + k): b for k, b in enumerate(extra)})
    return table


_BYTE_DECODER = _gpt2_byte_decoder()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


def _decoder_kind(tokenizer) -> str:
    """"byte_level" (GPT-2-style byte BPE: Qwen2, Llama-3, SmolLM2), "metaspace"
    (SentencePiece-style '▁' pieces, with byte fallback: Llama-2, Mistral) or "text"."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "text"
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (AttributeError, ValueError):
        return "text"
    parts = decoder.get("decoders") or [decoder]
    kinds = {d.get("type") for d in parts if isinstance(d, dict)}
    if "ByteLevel" in kinds:
        return "byte_level"
    if kinds & {"Metaspace", "ByteFallback"}:
        return "metaspace"
    return "text"


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each token id stands for in running text (ids beyond the tokenizer give b''):
    from its vocabulary piece for byte-level and SentencePiece-style tokenizers, else (and for
    pieces outside those schemes, such as added special tokens) its text decoded alone."""
    n = min(len(tokenizer), vocab_size)
    texts = token_texts(tokenizer, n)
    kind = _decoder_kind(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n))) if kind != "text" else [None] * n
    out = []
    for text, piece in zip(texts, pieces):
        raw = None
        if piece is not None and kind == "byte_level":
            try:
                raw = bytes(_BYTE_DECODER[c] for c in piece)
            except KeyError:
                raw = None
        elif piece is not None and kind == "metaspace":
            m = _BYTE_PIECE.fullmatch(piece)
            raw = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()
        out.append(raw if raw is not None else text.encode())
    return out + [b""] * (vocab_size - n)


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tables_for(tokenizer, vocab_size: int, stop_strings: Sequence[str]) -> StopTables:
    """Tables for a tokenizer, cached per (tokenizer, vocab size, stop strings) for as long as
    the tokenizer lives (keyed weakly: a new tokenizer never sees another's tables)."""
    key = (vocab_size, tuple(stop_strings))

    def build():
        return build_tables(token_bytes(tokenizer, vocab_size),
                            [s.encode() for s in stop_strings])
    try:
        per_tokenizer = _TABLES.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: build every time
        return build()
    if key not in per_tokenizer:
        per_tokenizer[key] = build()
    return per_tokenizer[key]
