"""GLM tokenizers, equal to the hub `tokenization_glm.py` under transformers 4.26
(docs/glm.md, "Tokenizers").

`load_tokenizer` dispatches on `tokenizer_class` in `tokenizer_config.json` as upstream does.
Each class wraps a real text tokenizer (sentencepiece, GPT-2 byte-level BPE, BERT WordPiece
from the `tokenizers` library); the shared base reproduces what transformers 4.26 did around
it: special tokens written in the text are split out whole, the whitespace next to them is
stripped, and each text chunk is encoded on its own. Special-token ids always come from the
checkpoint's files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SOP, EOP = "<|startofpiece|>", "<|endofpiece|>"
MASK, SMASK, GMASK = "[MASK]", "[sMASK]", "[gMASK]"
SPECIAL_ROLES = ("eos_token", "pad_token", "cls_token", "mask_token", "unk_token", "sep_token")
# transformers 4.26 `clean_up_tokenization`, applied by `decode` by default.
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be loaded, or text that cannot be encoded."""


def _token_text(value: str | dict | None) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class GLMTokenizer:
    """Special-token handling shared by the three GLM tokenizer kinds.

    Subclasses provide `_encode_chunk`, `_decode_chunk`, `_base_id`, `_base_size` and say
    which mask tokens the model knows and which id closes a hub encoding.
    """

    task_masks = (MASK, SMASK, GMASK)

    def __init__(self, model_dir: Path, tokenizer_config: dict):
        self.model_dir = model_dir
        special_map = dict(tokenizer_config)
        map_path = model_dir / "special_tokens_map.json"
        if map_path.is_file():
            special_map.update(json.loads(map_path.read_text()))
        self.special_tokens = {
            role: _token_text(special_map.get(role)) for role in SPECIAL_ROLES
            if special_map.get(role) is not None
        }
        additional = [_token_text(t) for t in special_map.get("additional_special_tokens", [])]
        self.added_tokens = self._load_added_tokens(
            model_dir, [*self.special_tokens.values(), *additional]
        )
        self.no_split_tokens = sorted(
            {*self.added_tokens, *self.special_tokens.values(), *additional},
            key=len, reverse=True,
        )
        self._split_pattern = re.compile("(" + "|".join(map(re.escape, self.no_split_tokens)) + ")")
        self.id_to_added = {i: t for t, i in self.added_tokens.items()}
        self.special_ids = {self.token_id(t) for t in [*self.special_tokens.values(), *additional]}

        self.cls_id = self.token_id(self.special_tokens.get("cls_token", "[CLS]"))
        self.eos_id = self.token_id(self.special_tokens.get("eos_token", "<|endoftext|>"))
        self.pad_id = self.token_id(self.special_tokens.get("pad_token", "<|endoftext|>"))
        self.sop_id, self.eop_id = self.token_id(SOP), self.token_id(EOP)
        self.mask_token_ids = [self.token_id(t) for t in self.task_masks]
        self.mask_names = dict(zip(self.mask_token_ids, self.task_masks, strict=True))

    # -- what subclasses provide -------------------------------------------------------
    def _encode_chunk(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_chunk(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _base_id(self, token: str) -> int | None:
        raise NotImplementedError

    def _base_size(self) -> int:
        raise NotImplementedError

    def _default_added_order(self, wanted: list[str]) -> list[str]:
        """Tokens a tokenizer appends after its base vocabulary when no added_tokens.json."""
        return [t for t in wanted if self._base_id(t) is None]

    @property
    def suffix_id(self) -> int:
        """The id the hub tokenizer appends to a single sequence (eos; BERT: [SEP])."""
        return self.eos_id

    # -- shared ------------------------------------------------------------------------
    def _load_added_tokens(self, model_dir: Path, wanted: list[str]) -> dict[str, int]:
        path = model_dir / "added_tokens.json"
        if path.is_file():
            return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
        order = self._default_added_order(wanted)
        seen: dict[str, int] = {}
        for token in order:
            if token not in seen:
                seen[token] = self._base_size() + len(seen)
        return seen

    def token_id(self, token: str) -> int:
        if token in self.added_tokens:
            return self.added_tokens[token]
        base = self._base_id(token)
        if base is None:
            raise TokenizerError(f"{self.model_dir}: token {token!r} has no id in the "
                                 "vocabulary or added_tokens.json")
        return base

    def __len__(self) -> int:
        return max(self._base_size(), max(self.id_to_added, default=-1) + 1)

    def tokenize_ids(self, text: str) -> list[int]:
        """Text ids without [CLS]/eos, special tokens split out whole (transformers 4.26)."""
        chunks = self._split_pattern.split(text)
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            if i % 2:  # a special token
                ids.append(self.token_id(chunk))
                continue
            if i > 0:
                chunk = chunk.lstrip()
            if i < len(chunks) - 1:
                chunk = chunk.rstrip()
            if chunk:
                ids.extend(self._encode_chunk(chunk))
        return ids

    def encode(self, text: str) -> list[int]:
        """The hub encoding of one sequence: `[CLS] text <|endoftext|>` (BERT: `... [SEP]`)."""
        return [self.cls_id, *self.tokenize_ids(text), self.suffix_id]

    def encode_original(self, text: str) -> list[int]:
        """THUDM/GLM `generate_samples.py`: no eos after a text that ends with `[gMASK]`."""
        ids = [self.cls_id, *self.tokenize_ids(text)]
        return ids if text.endswith(GMASK) else [*ids, self.eos_id]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """transformers 4.26 `_decode`: added tokens joined with spaces, then cleanup."""
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if skip_special_tokens and token_id in self.special_ids:
                continue
            if token_id in self.id_to_added:
                if run:
                    parts.append(self._decode_chunk(run))
                    run = []
                parts.append(self.id_to_added[token_id])
            elif 0 <= token_id < self._base_size():
                run.append(token_id)
            # ids past the tokenizer (the embedding's padding rows) have no text
        if run:
            parts.append(self._decode_chunk(run))
        text = " ".join(parts)
        for before, after in _CLEANUPS:
            text = text.replace(before, after)
        return text


class GLMChineseTokenizer(GLMTokenizer):
    """glm-*-chinese: sentencepiece `cog-pretrain.model` plus added tokens."""

    def __init__(self, model_dir: Path, tokenizer_config: dict):
        import sentencepiece

        model = model_dir / "cog-pretrain.model"
        if not model.is_file():
            raise TokenizerError(f"{model}: missing (GLMChineseTokenizer needs it)")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
        super().__init__(model_dir, tokenizer_config)

    def _encode_chunk(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _decode_chunk(self, ids: list[int]) -> str:
        return self.sp.decode([self.sp.id_to_piece(i) for i in ids])

    def _base_id(self, token: str) -> int | None:
        return self.sp.piece_to_id(token)  # unknown pieces resolve to <unk>, as upstream

    def _base_size(self) -> int:
        return self.sp.get_piece_size()


class _VocabTokenizer(GLMTokenizer):
    """A GLM tokenizer around a `tokenizers` model with a vocabulary dict."""

    vocab: dict[str, int]

    def _base_id(self, token: str) -> int | None:
        return self.vocab.get(token)

    def _base_size(self) -> int:
        return len(self.vocab)

    def _encode_chunk(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def _tokens(self, ids: list[int]) -> list[str]:
        return [self.inverse_vocab[i] for i in ids]


class GLMGPT2Tokenizer(_VocabTokenizer):
    """glm-2b / glm-10b: GPT-2 byte-level BPE (`vocab.json` + `merges.txt`)."""

    def __init__(self, model_dir: Path, tokenizer_config: dict):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab, merges = model_dir / "vocab.json", model_dir / "merges.txt"
        for path in (vocab, merges):
            if not path.is_file():
                raise TokenizerError(f"{path}: missing (GLMGPT2Tokenizer needs it)")
        self.backend = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        self.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self.byte_decoder = decoders.ByteLevel()
        self.vocab = json.loads(vocab.read_text(encoding="utf-8"))
        self.inverse_vocab = {i: t for t, i in self.vocab.items()}
        super().__init__(model_dir, tokenizer_config)

    def _default_added_order(self, wanted: list[str]) -> list[str]:
        # hub GLMGPT2Tokenizer appends these after the BPE vocabulary in this order (docs/glm.md)
        order = ["[SEP]", "[CLS]", MASK, SOP, EOP, GMASK, SMASK]
        return [t for t in order if self._base_id(t) is None]

    def _decode_chunk(self, ids: list[int]) -> str:
        return self.byte_decoder.decode(self._tokens(ids))


class GLMBertTokenizer(_VocabTokenizer):
    """glm-large / glm-515m: uncased BERT WordPiece (`vocab.txt`); only `[MASK]` blanks."""

    task_masks = (MASK,)

    def __init__(self, model_dir: Path, tokenizer_config: dict):
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

        vocab = model_dir / "vocab.txt"
        if not vocab.is_file():
            raise TokenizerError(f"{vocab}: missing (GLMBertTokenizer needs it)")
        lines = vocab.read_text(encoding="utf-8").splitlines()
        self.vocab = {token: i for i, token in enumerate(lines)}
        self.inverse_vocab = dict(enumerate(lines))
        self.backend = Tokenizer(models.WordPiece(self.vocab, unk_token="[UNK]",
                                                  max_input_chars_per_word=100))
        lowercase = tokenizer_config.get("do_lower_case", True)
        self.backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        self.backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        super().__init__(model_dir, tokenizer_config)

    @property
    def suffix_id(self) -> int:
        return self.token_id(self.special_tokens.get("sep_token", "[SEP]"))

    def _decode_chunk(self, ids: list[int]) -> str:
        return " ".join(self._tokens(ids)).replace(" ##", "").strip()


TOKENIZER_CLASSES: dict[str, type[GLMTokenizer]] = {
    "GLMChineseTokenizer": GLMChineseTokenizer,
    "GLMGPT2Tokenizer": GLMGPT2Tokenizer,
    "GLMBertTokenizer": GLMBertTokenizer,
}


def load_tokenizer(model_dir: str | Path) -> GLMTokenizer:
    """The checkpoint's tokenizer, chosen by `tokenizer_class` in tokenizer_config.json."""
    root = Path(model_dir)
    config_path = root / "tokenizer_config.json"
    if not config_path.is_file():
        raise TokenizerError(f"{config_path}: missing; cannot tell which GLM tokenizer to use")
    config = json.loads(config_path.read_text())
    name = config.get("tokenizer_class")
    if name not in TOKENIZER_CLASSES:
        raise TokenizerError(
            f"{config_path}: unknown tokenizer_class {name!r}; supported: "
            f"{', '.join(TOKENIZER_CLASSES)}"
        )
    return TOKENIZER_CLASSES[name](root, config)
