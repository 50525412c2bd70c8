"""GLM tokenizers, equal to the hub `tokenization_glm.py` under transformers 4.26
(docs/glm.md, "Tokenizers").

`load_tokenizer` dispatches on `tokenizer_class` in `tokenizer_config.json` as upstream does.
Each class wraps a real text tokenizer (sentencepiece, GPT-2 byte-level BPE, BERT WordPiece
from the `tokenizers` library); the shared base reproduces what transformers 4.26 did around
it: special tokens are declared by the class defaults, `tokenizer_config.json` and
`special_tokens_map.json`; a declared token without an id of its own is appended after the last
id; special tokens written in the text are split out whole, the whitespace next to them is
stripped (as their AddedToken flags say), and each text chunk is encoded on its own.
Special-token ids always come from the checkpoint's files. A token without an id fails only
where it is needed: a role GLM needs (`cls_id`, `sop_id`, ...) when it is asked for, a token
written in a text when that text is encoded.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import ClassVar

from pipeline.glm.requests import InfillError
from schemas.errors import ErrorType

SOP, EOP = "<|startofpiece|>", "<|endofpiece|>"
MASK, SMASK, GMASK = "[MASK]", "[sMASK]", "[gMASK]"
GPT2_EOS = "<|endoftext|>"
ADDITIONAL = "additional_special_tokens"
# transformers 4.26 `SPECIAL_TOKENS_ATTRIBUTES`, in its order: the order in which special tokens
# without an id are appended
SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token", ADDITIONAL)
# transformers 4.26 `clean_up_tokenization`, applied by `decode` by default.
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be loaded, or text that cannot be encoded."""


class MissingTokenError(InfillError, TokenizerError):
    """A text names a special token that has no id: that row fails (`encode_error`), the
    tokenizer still encodes every other text."""


@dataclasses.dataclass(frozen=True)
class SpecialToken:
    """A special token as transformers 4.26 holds it: a plain string, or an AddedToken (a
    `{"content": ...}` object) whose lstrip/rstrip flags (default false) say whether the
    whitespace before/after it in a text is stripped; next to a plain string both sides are."""

    content: str
    added_token: bool = False
    lstrip: bool = False
    rstrip: bool = False

    @classmethod
    def parse(cls, value: object, source: Path) -> SpecialToken:
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            # other keys ("__type", "single_word", "normalized", ...) do not matter here
            return cls(value["content"], True, bool(value.get("lstrip")), bool(value.get("rstrip")))
        raise TokenizerError(f"{source}: special token {value!r} is neither a string nor an "
                             'object with a "content" string')


def _parse_special_tokens(value: object, source: Path) -> list[SpecialToken]:
    """One role's value: null (no token), a token, or a list (additional_special_tokens)."""
    if value is None:
        return []
    if isinstance(value, list):
        return [SpecialToken.parse(item, source) for item in value]
    return [SpecialToken.parse(value, source)]


def _read_json_object(path: Path) -> dict:
    """A JSON file holding an object; anything else is a TokenizerError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


class GLMTokenizer:
    """Special-token handling shared by the three GLM tokenizer kinds.

    Subclasses provide `_encode_chunk`, `_decode_chunk`, `_base_id`, `_base_size` and their
    vocabulary file, and say which mask tokens the model knows, which special tokens their
    transformers class declares itself and which id closes a hub encoding.
    """

    task_masks = (MASK, SMASK, GMASK)
    vocabulary_file = ""
    # the transformers 4.26 class's constructor defaults
    default_special_tokens: ClassVar[dict[str, str]] = {}
    # roles whose string values that constructor wraps as AddedToken(lstrip=False, rstrip=False)
    added_token_roles: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model_dir: Path, tokenizer_config: dict):
        self.model_dir = model_dir
        declared = self._declared_special_tokens(tokenizer_config)
        self.special_tokens = [t for role in SPECIAL_ROLES for t in declared.get(role, [])]
        self.role_tokens = {role: tokens[0].content for role, tokens in declared.items()
                            if role != ADDITIONAL and tokens}
        self.unk_token = self.role_tokens.get("unk_token")
        self.added_tokens = self._read_added_tokens()
        self._append_special_tokens_without_id()
        self.id_to_added = {i: t for t, i in self.added_tokens.items()}
        self._upstream_no_split = {t.content for t in self.special_tokens} | set(self.added_tokens)
        self.no_split_tokens = sorted(self._upstream_no_split | {SOP, EOP, *self.task_masks},
                                      key=len, reverse=True)
        self._split_pattern = re.compile("(" + "|".join(map(re.escape, self.no_split_tokens)) + ")")
        self._strip_sides = self._whitespace_rules()
        self.special_ids = {self._upstream_id(t.content) for t in self.special_tokens} - {None}
        masks = [(name, i) for name in self.task_masks if (i := self.find_id(name)) is not None]
        self.mask_token_ids = [i for _, i in masks]  # the blanks this checkpoint can fill
        self.mask_names = {i: name for name, i in masks}

    # -- what subclasses provide -------------------------------------------------------
    def _encode_chunk(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_chunk(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _base_id(self, token: str) -> int | None:
        """The token's id in the base vocabulary; None when it is not there."""
        raise NotImplementedError

    def _base_size(self) -> int:
        raise NotImplementedError

    def _unknown_id(self) -> int | None:
        """What 4.26 converts a token outside the vocabulary to: the unknown token's id in the
        base vocabulary (None when there is none)."""
        return None if self.unk_token is None else self._base_id(self.unk_token)

    @property
    def suffix_id(self) -> int:
        """The id the hub tokenizer appends to a single sequence (eos; BERT: [SEP])."""
        return self.eos_id

    # -- special tokens and their ids --------------------------------------------------
    def _declared_special_tokens(self, tokenizer_config: dict) -> dict[str, list[SpecialToken]]:
        """Role -> tokens as 4.26 `from_pretrained` sets them: the constructor gets the class
        defaults overridden by tokenizer_config.json, then special_tokens_map.json replaces
        every role it names."""
        config_path = self.model_dir / "tokenizer_config.json"
        given = {**self.default_special_tokens, **tokenizer_config}
        declared = {role: self._constructor_tokens(role, given[role], config_path)
                    for role in SPECIAL_ROLES if role in given}
        map_path = self.model_dir / "special_tokens_map.json"
        if map_path.is_file():
            special_map = _read_json_object(map_path)
            declared.update({role: _parse_special_tokens(special_map[role], map_path)
                             for role in SPECIAL_ROLES if role in special_map})
        return declared

    def _constructor_tokens(self, role: str, value: object, source: Path) -> list[SpecialToken]:
        if role in self.added_token_roles and isinstance(value, str):
            return [SpecialToken(value, added_token=True)]
        return _parse_special_tokens(value, source)

    def _read_added_tokens(self) -> dict[str, int]:
        path = self.model_dir / "added_tokens.json"
        if not path.is_file():
            return {}
        return {str(token): int(i) for token, i in _read_json_object(path).items()}

    def _append_special_tokens_without_id(self) -> None:
        """4.26 `sanitize_special_tokens`: each special token that converts to the unknown
        token's id (it has none of its own) gets the next id, in declaration order. The unknown
        token itself never does: a `[UNK]` missing from the files stays without an id."""
        unknown = self._upstream_id(self.unk_token)
        for token in dict.fromkeys(t.content for t in self.special_tokens):
            if token != self.unk_token and self._upstream_id(token) == unknown:
                self.added_tokens[token] = len(self)

    def _whitespace_rules(self) -> dict[str, tuple[bool, bool]]:
        """(strip before, strip after) for each split-out token, as 4.26 `tokenize`: the last
        AddedToken declaring that text decides; otherwise both sides are stripped."""
        rules = dict.fromkeys(self.no_split_tokens, (True, True))
        rules.update({t.content: (t.lstrip, t.rstrip) for t in self.special_tokens
                      if t.added_token})
        return rules

    def find_id(self, token: str) -> int | None:
        """The token's own id (added tokens first, then the vocabulary); None without one."""
        if token in self.added_tokens:
            return self.added_tokens[token]
        return self._base_id(token)

    def _upstream_id(self, token: str | None) -> int | None:
        """4.26 `convert_tokens_to_ids`: the token's own id, else the unknown token's."""
        if token is None:
            return None
        own = self.find_id(token)
        return self._unknown_id() if own is None else own

    def token_id(self, token: str) -> int:
        """The token's own id; a TokenizerError naming the token and files when it has none."""
        token_id = self.find_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.model_dir}: token {token!r} has no id in "
                                 f"{self.vocabulary_file} or added_tokens.json; GLM needs it "
                                 "to fill blanks")
        return token_id

    def _role_id(self, role: str, glm_token: str) -> int:
        """The id of the token the checkpoint names for `role` (GLM's token if it names none)."""
        return self.token_id(self.role_tokens.get(role, glm_token))

    @property
    def cls_id(self) -> int:
        return self._role_id("cls_token", "[CLS]")

    @property
    def eos_id(self) -> int:
        return self._role_id("eos_token", GPT2_EOS)

    @property
    def pad_id(self) -> int:
        return self._role_id("pad_token", GPT2_EOS)

    @property
    def sop_id(self) -> int:
        return self.token_id(SOP)

    @property
    def eop_id(self) -> int:
        return self.token_id(EOP)

    def __len__(self) -> int:
        return max(self._base_size(), max(self.added_tokens.values(), default=-1) + 1)

    # -- encoding and decoding ---------------------------------------------------------
    def _text_token_id(self, token: str) -> int:
        """A special token written in the text. Those 4.26 splits out convert as there (one
        without an id to the unknown token); GLM's own tokens need an id of their own."""
        token_id = (self._upstream_id(token) if token in self._upstream_no_split
                    else self.find_id(token))
        if token_id is None:
            raise MissingTokenError(
                ErrorType.ENCODE_ERROR,
                f"text contains {token!r}, which has no id in this tokenizer ({self.model_dir}: "
                f"not in {self.vocabulary_file} or added_tokens.json)",
            )
        return token_id

    def tokenize_ids(self, text: str) -> list[int]:
        """Text ids without [CLS]/eos, special tokens split out whole (transformers 4.26)."""
        chunks = self._split_pattern.split(text)  # text, token, text, ..., token, text
        for i in range(1, len(chunks), 2):
            strip_before, strip_after = self._strip_sides[chunks[i]]
            if strip_before:
                chunks[i - 1] = chunks[i - 1].rstrip()
            if strip_after:
                chunks[i + 1] = chunks[i + 1].lstrip()
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            if i % 2:
                ids.append(self._text_token_id(chunk))
            elif chunk:
                ids.extend(self._encode_chunk(chunk))
        return ids

    def mask_spans(self, text: str) -> list[tuple[int, int]]:
        """The [start, end) character offsets of the blanks written in `text`: the k-th span
        is the k-th mask id of `tokenize_ids(text)`, found by the same split, so that the text
        and the ids always agree on where the blanks are."""
        return [match.span() for match in self._split_pattern.finditer(text)
                if self._text_token_id(match.group()) in self.mask_names]

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

    vocabulary_file = "cog-pretrain.model"

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
        piece_id = self.sp.piece_to_id(token)  # an unknown piece gives <unk>'s id
        return piece_id if self.sp.id_to_piece(piece_id) == token else None

    def _base_size(self) -> int:
        return self.sp.get_piece_size()

    def _unknown_id(self) -> int | None:
        return self.sp.unk_id()  # upstream's `PieceToId` of any unknown piece


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

    vocabulary_file = "vocab.json"
    default_special_tokens: ClassVar[dict[str, str]] = {
        "bos_token": GPT2_EOS, "eos_token": GPT2_EOS, "unk_token": GPT2_EOS}
    added_token_roles = frozenset({"bos_token", "eos_token", "unk_token", "pad_token"})

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

    def _decode_chunk(self, ids: list[int]) -> str:
        return self.byte_decoder.decode(self._tokens(ids))


class GLMBertTokenizer(_VocabTokenizer):
    """glm-large / glm-515m: uncased BERT WordPiece (`vocab.txt`); only `[MASK]` blanks."""

    task_masks = (MASK,)
    vocabulary_file = "vocab.txt"
    default_special_tokens: ClassVar[dict[str, str]] = {
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": MASK}

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
        return self._role_id("sep_token", "[SEP]")

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
    config = _read_json_object(config_path)
    name = config.get("tokenizer_class")
    if name not in TOKENIZER_CLASSES:
        raise TokenizerError(
            f"{config_path}: unknown tokenizer_class {name!r}; supported: "
            f"{', '.join(TOKENIZER_CLASSES)}"
        )
    return TOKENIZER_CLASSES[name](root, config)
