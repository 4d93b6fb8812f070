"""Tokenizer metadata for a GGUF file, read from the checkpoint's own Hugging Face tokenizer.

llama.cpp knows two tokenizer kinds that Llama-family checkpoints use:
- "gpt2": byte-level BPE (SmolLM2, Llama 3, Qwen2). Tokens and merges are written as the tokenizer holds
  them; `tokenizer.ggml.pre` names llama.cpp's pre-tokenizer, recognised here from the tokenizer's own
  pre-tokenizer definition (a pre-tokenizer llama.cpp does not implement is an error, never a guess);
- "llama": SentencePiece-style BPE with byte fallback (Llama 1/2, Mistral). llama.cpp merges the pair
  whose joined piece has the highest score, so each piece's score is minus the rank of the merge that
  produces it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from gguf import TokenType

# llama.cpp pre-tokenizer names, keyed by the Hugging Face pre-tokenizer that splits text the same way
# (each component as (kind, setting)). The regexes are the ones these tokenizers publish.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    (("byte_level", True),): "gpt-2",
    (("digits", True), ("byte_level", True)): "smollm",
    (("split", _LLAMA3_SPLIT), ("byte_level", False)): "llama-bpe",
    (("split", _QWEN2_SPLIT), ("byte_level", False)): "qwen2",
}


class TokenizerExportError(ValueError):
    """A tokenizer llama.cpp cannot reproduce."""


@dataclass
class GGUFVocab:
    model: str  # "gpt2" or "llama"
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def write_to(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _components(pre: dict | None) -> tuple:
    """A pre-tokenizer as a tuple of (kind, setting), flattening Sequence."""
    if pre is None:
        return ()
    if pre["type"] == "Sequence":
        return tuple(c for p in pre["pretokenizers"] for c in _components(p))
    if pre["type"] == "ByteLevel":
        return (("byte_level", bool(pre.get("use_regex", True))),)
    if pre["type"] == "Digits":
        return (("digits", bool(pre.get("individual_digits", False))),)
    if pre["type"] == "Split":
        pattern = pre["pattern"]
        return (("split", pattern.get("Regex", pattern.get("String"))),)
    return ((pre["type"], json.dumps(pre, sort_keys=True)),)


def _merge_strings(merges: list) -> list[str]:
    return [" ".join(m) if isinstance(m, (list, tuple)) else m for m in merges]


def _added_behaviour(tokenizer) -> tuple[bool, bool]:
    """Whether encoding plain text adds BOS / EOS, as the tokenizer really behaves."""
    ids = tokenizer("a").input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids) and bos is not None and ids[0] == bos, bool(ids) and eos is not None and ids[-1] == eos


def vocab_from_tokenizer(tokenizer, vocab_size: int) -> GGUFVocab:
    """The GGUF tokenizer metadata of a fast Hugging Face tokenizer, padded to the model's `vocab_size`."""
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerExportError("only fast tokenizers (tokenizer.json) can be exported to GGUF")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise TokenizerExportError(f"a {model['type']} tokenizer cannot be exported to GGUF; only BPE tokenizers can")

    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    n = max(id_to_token) + 1
    if n > vocab_size:
        raise TokenizerExportError(f"the tokenizer has {n} tokens but the model only {vocab_size} embeddings")
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = id_to_token.get(i)
        if token is None:  # embedding rows no token maps to (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(TokenType.CONTROL if added[token].special else TokenType.USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token) and model.get("byte_fallback"):
            tokens.append(token)
            types.append(TokenType.BYTE)
        elif token == model.get("unk_token"):
            tokens.append(token)
            types.append(TokenType.UNKNOWN)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)

    add_bos, add_eos = _added_behaviour(tokenizer)
    special_ids = {
        kind: getattr(tokenizer, f"{kind}_token_id")
        for kind in ("bos", "eos", "unk", "pad")
        if getattr(tokenizer, f"{kind}_token_id", None) is not None
    }
    common = dict(tokens=tokens, types=[int(t) for t in types], special_ids=special_ids, add_bos=add_bos,
                  add_eos=add_eos, chat_template=getattr(tokenizer, "chat_template", None))  # fmt: skip
    merges = _merge_strings(model.get("merges", []))

    if model.get("byte_fallback"):
        # SentencePiece-style: llama.cpp merges by piece score, so a piece scores minus its merge's rank.
        scores = [0.0] * vocab_size
        index = {t: i for i, t in enumerate(tokens)}
        for rank, merge in enumerate(merges):
            joined = merge.replace(" ", "")
            if joined in index and scores[index[joined]] == 0.0:
                scores[index[joined]] = -float(rank + 1)
        return GGUFVocab(model="llama", pre="default", scores=scores, add_space_prefix=_adds_space_prefix(spec), **common)

    components = _components(spec.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(components)
    if pre is None:
        raise TokenizerExportError(
            f"llama.cpp has no pre-tokenizer known to match this tokenizer's ({components}); "
            "supported: byte-level BPE as in GPT-2, SmolLM2, Llama 3 and Qwen2"
        )
    return GGUFVocab(model="gpt2", pre=pre, merges=merges, **common)


def _adds_space_prefix(spec: dict) -> bool:
    """SentencePiece-style tokenizers prepend '▁' to the text (a Prepend normalizer or Metaspace)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text or '"add_prefix_space": true' in text
