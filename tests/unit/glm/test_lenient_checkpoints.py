"""Checkpoints that differ in detail load as they do upstream: THUDM's hub `tokenization_glm.py`
and `configuration_glm.py` under transformers 4.26 (docs/glm.md, "Tokenizers").

Each test builds a small tokenizer directory from real BPE / sentencepiece files, says in its
docstring what upstream does with it, and checks what we do.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece

from pipeline.glm.checkpoint import load_config
from pipeline.glm.modeling import GLMModel
from pipeline.glm.procedures import iterative
from pipeline.glm.requests import InfillError, SamplingParams
from pipeline.glm.tokenization import EOP, SOP, GLMTokenizer, TokenizerError, load_tokenizer
from schemas.errors import ErrorType
from tests.fixtures import DEMO_TOKENIZER, make_tiny_checkpoint
from tests.unit.glm.test_checkpoint import write_config
from tests.unit.glm.test_tokenizers import CORPUS, GLM_SPECIALS, write_gpt2_tokenizer

# GLM's tokens in the order 4.26 appends them for GLM_SPECIALS (the GPT-2 kind)
GPT2_APPENDED = ("[SEP]", "[CLS]", "[MASK]", SOP, EOP, "[gMASK]", "[sMASK]")
HUB_SPECIALS = {**GLM_SPECIALS, "unk_token": "[UNK]"}  # the hub configs' (spec §5.1)
BPE_SIZE = 400  # the vocabulary of write_gpt2_tokenizer
TEXTS = ["Tsinghua University is located in [MASK].", "a [MASK] b [sMASK] c [gMASK]",
         "  spaced   out  [MASK]", "x <|endoftext|> y [MASK]"]


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value))


def glm10b_added_tokens() -> dict[str, int]:
    """GLM's tokens after the GPT-2 vocabulary (training tokenizer's order), no `[UNK]`."""
    order = (SOP, EOP, "[CLS]", "[MASK]", "[SEP]", "[gMASK]", "[sMASK]")
    return {token: BPE_SIZE + i for i, token in enumerate(order)}


def write_chinese_tokenizer(model_dir: Path, specials: dict | None = None,
                            added_tokens: bool = True) -> Path:
    """The demo's sentencepiece model, its added_tokens.json when `added_tokens`, and a
    tokenizer_config.json declaring `specials` (default: the hub's)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    names = ["cog-pretrain.model", *(["added_tokens.json"] if added_tokens else [])]
    for name in names:
        shutil.copyfile(DEMO_TOKENIZER / name, model_dir / name)
    specials = HUB_SPECIALS if specials is None else specials
    write_json(model_dir / "tokenizer_config.json",
               {"tokenizer_class": "GLMChineseTokenizer", **specials})
    return model_dir


def as_added_token(token: str, **fields: object) -> dict:
    """A special token as `save_pretrained` writes it into special_tokens_map.json."""
    return {"content": token, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False, **fields}


def as_added_tokens(specials: dict, **fields: object) -> dict:
    """Every token of `specials` as such an object."""
    return {role: [as_added_token(t, **fields) for t in value] if isinstance(value, list)
            else as_added_token(value, **fields) for role, value in specials.items()}


def encodings(tokenizer: GLMTokenizer) -> list[list[int]]:
    return [tokenizer.encode(text) for text in TEXTS]


# -- (1) a special token that upstream loads without an id -------------------------------
@pytest.mark.parametrize("with_added_file", [True, False],
                         ids=["added_tokens.json", "no added_tokens.json"])
def test_gpt2_unk_token_without_an_id_loads(tmp_path: Path, with_added_file: bool) -> None:
    """glm-10b's kind: special_tokens_map.json names `"unk_token": "[UNK]"`, which neither
    vocab.json nor added_tokens.json holds.

    Upstream: loads. `sanitize_special_tokens` appends every declared special token that
    converts to the unknown token's id except the unknown token itself, so `[UNK]` never gets
    one: `unk_token_id` is None. Byte-level BPE never emits an unknown token, so encoding and
    decoding text are unaffected; GLM's tokens come from added_tokens.json or, without it, are
    appended after the vocabulary in declaration order. A text that writes `[UNK]` gets None
    among its ids; here that text alone fails (encode_error) with a message naming the token.
    """
    added = glm10b_added_tokens() if with_added_file else None
    model_dir = write_gpt2_tokenizer(tmp_path, added)
    write_json(model_dir / "special_tokens_map.json", HUB_SPECIALS)
    tokenizer = load_tokenizer(model_dir)

    assert tokenizer.find_id("[UNK]") is None
    expected = added or {token: BPE_SIZE + i for i, token in enumerate(GPT2_APPENDED)}
    assert {token: tokenizer.token_id(token) for token in expected} == expected
    assert len(tokenizer) == BPE_SIZE + 7
    text_ids = tokenizer.tokenize_ids
    ids = tokenizer.encode(TEXTS[0])
    assert ids == [expected["[CLS]"], *text_ids("Tsinghua University is located in"),
                   expected["[MASK]"], *text_ids("."), tokenizer.eos_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Tsinghua University is located in."
    with pytest.raises(InfillError, match=r"text contains '\[UNK\]', which has no id") as err:
        tokenizer.encode("a [UNK] b")
    assert err.value.error_type == ErrorType.ENCODE_ERROR
    assert isinstance(err.value, TokenizerError)


# -- (2) no added_tokens.json --------------------------------------------------------------
def test_gpt2_special_tokens_in_the_vocabulary(tmp_path: Path) -> None:
    """No added_tokens.json; GLM's tokens are entries of vocab.json itself.

    Upstream: their ids come from vocab.json, nothing is appended (`len` is the vocabulary's);
    declared tokens written in a text are split out whole. They are not added tokens, so
    `decode` joins them into the byte-level text without spaces around them.
    """
    model_dir = write_gpt2_tokenizer(tmp_path, in_vocab=GPT2_APPENDED)
    vocab = json.loads((model_dir / "vocab.json").read_text())
    tokenizer = load_tokenizer(model_dir)

    assert {t: tokenizer.token_id(t) for t in GPT2_APPENDED} == {t: vocab[t] for t in GPT2_APPENDED}
    assert not tokenizer.added_tokens and len(tokenizer) == len(vocab)
    ids = tokenizer.encode(TEXTS[0])
    assert ids == [vocab["[CLS]"], *tokenizer.tokenize_ids("Tsinghua University is located in"),
                   vocab["[MASK]"], *tokenizer.tokenize_ids("."), vocab["<|endoftext|>"]]
    assert tokenizer.decode(ids) == "[CLS]Tsinghua University is located in[MASK].<|endoftext|>"


def test_chinese_special_tokens_in_the_sentencepiece_model(tmp_path: Path) -> None:
    """No added_tokens.json; GLM's tokens are user-defined pieces of cog-pretrain.model.

    Upstream: `PieceToId` gives their ids, nothing is appended; `[UNK]` is no piece and, like
    every unknown piece, converts to sentencepiece's `<unk>`.
    """
    glm_tokens = ("<|endoftext|>", *GPT2_APPENDED)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=120, model_type="bpe",
        user_defined_symbols=list(glm_tokens), minloglevel=2)
    model_dir = write_chinese_tokenizer(tmp_path, added_tokens=False)
    (model_dir / "cog-pretrain.model").write_bytes(model.getvalue())
    tokenizer = load_tokenizer(model_dir)
    sp = tokenizer.sp

    assert {t: tokenizer.token_id(t) for t in glm_tokens} == {t: sp.piece_to_id(t)
                                                              for t in glm_tokens}
    assert not tokenizer.added_tokens and len(tokenizer) == sp.get_piece_size()
    assert tokenizer.encode("is [MASK] [UNK]") == [sp.piece_to_id("[CLS]"), *sp.encode("is"),
                                                   sp.piece_to_id("[MASK]"), sp.unk_id(),
                                                   sp.piece_to_id("<|endoftext|>")]


def test_chinese_special_tokens_appended_without_added_tokens_file(tmp_path: Path) -> None:
    """No added_tokens.json; the special tokens are only declared (tokenizer_config.json).

    Upstream: `sanitize_special_tokens` appends each declared token sentencepiece does not
    know after its pieces, in the order of `SPECIAL_TOKENS_ATTRIBUTES` (eos, unk, sep, pad,
    cls, mask, then the additional tokens), skipping repeats and the unknown token `[UNK]`,
    which converts to `<unk>`.
    """
    tokenizer = load_tokenizer(write_chinese_tokenizer(tmp_path, added_tokens=False))
    base = tokenizer.sp.get_piece_size()
    order = ("<|endoftext|>", "[SEP]", "[CLS]", "[MASK]", SOP, EOP, "[gMASK]", "[sMASK]")
    assert tokenizer.added_tokens == {token: base + i for i, token in enumerate(order)}
    assert tokenizer.encode("[UNK]") == [base + 2, tokenizer.sp.unk_id(), base]


def test_needed_token_without_an_id_fails_where_it_is_needed(tmp_path: Path) -> None:
    """GLM's `<|startofpiece|>`, `<|endofpiece|>` and `[gMASK]` are nowhere: not in vocab.json,
    no added_tokens.json, not declared (additional_special_tokens lists only `[sMASK]`).

    Upstream: loads; `sop_token_id` and friends convert to the unknown token's id (GPT-2's
    default unk `<|endoftext|>`), so infilling silently feeds the wrong token, and a written
    `[gMASK]` is not split out. Here: loads; asking for sop or eop raises an error naming the
    token, the directory and the files; a text with `[gMASK]` fails alone (encode_error);
    `[MASK]` and `[sMASK]`, declared and appended, work.
    """
    specials = {**GLM_SPECIALS, "additional_special_tokens": ["[sMASK]"]}
    model_dir = write_gpt2_tokenizer(tmp_path, specials=specials)
    tokenizer = load_tokenizer(model_dir)

    assert list(tokenizer.mask_names.values()) == ["[MASK]", "[sMASK]"]
    for role, token in (("sop_id", SOP), ("eop_id", EOP)):
        with pytest.raises(TokenizerError, match=re.escape(
                f"{model_dir}: token {token!r} has no id in vocab.json or added_tokens.json")):
            getattr(tokenizer, role)
    procedure = iterative(tokenizer, "The story goes on: [gMASK]", SamplingParams(), 512)
    with pytest.raises(InfillError, match=r"'\[gMASK\]', which has no id .*vocab\.json") as err:
        next(procedure)
    assert err.value.error_type == ErrorType.ENCODE_ERROR
    assert tokenizer.token_id("[MASK]") in tokenizer.encode("a [MASK] b")


# -- (3) special tokens as {"content": ...} objects ----------------------------------------
@pytest.mark.parametrize(("lstrip", "rstrip"), [(False, False), (True, False), (False, True),
                                                (True, True)])
def test_special_tokens_map_objects_are_added_tokens(tmp_path: Path, lstrip: bool,
                                                     rstrip: bool) -> None:
    """special_tokens_map.json gives every token as an object, as `save_pretrained` writes it.

    Upstream: `from_pretrained` makes each object an `AddedToken(**value)`: ids are unchanged,
    but `tokenize` strips the whitespace before such a token only if its `lstrip` is true and
    after it only if `rstrip` is (both default false); a plain string strips both sides.
    """
    added = glm10b_added_tokens()
    plain = load_tokenizer(write_gpt2_tokenizer(tmp_path / "plain", added))
    model_dir = write_gpt2_tokenizer(tmp_path / "objects", added)
    special_map = {**as_added_tokens(GLM_SPECIALS),
                   "mask_token": as_added_token("[MASK]", lstrip=lstrip, rstrip=rstrip)}
    write_json(model_dir / "special_tokens_map.json", special_map)
    objects = load_tokenizer(model_dir)

    assert objects.added_tokens == plain.added_tokens == added
    text_ids, mask = objects.tokenize_ids, added["[MASK]"]
    assert plain.tokenize_ids("located in [MASK] .") == [*text_ids("located in"), mask,
                                                         *text_ids(".")]
    before, after = "located in" + " " * (not lstrip), " " * (not rstrip) + "."
    assert text_ids("located in [MASK] .") == [*text_ids(before), mask, *text_ids(after)]
    assert objects.tokenize_ids("[sMASK] x") == [added["[sMASK]"], *text_ids(" x")]


@pytest.mark.parametrize("tagged", [True, False], ids=["__type AddedToken", "untagged"])
def test_tokenizer_config_objects(tmp_path: Path, demo_tokenizer: GLMTokenizer,
                                  tagged: bool) -> None:
    """tokenizer_config.json gives the special tokens as objects.

    Upstream: 4.26 turns an object tagged `"__type": "AddedToken"` (what its `save_pretrained`
    writes there) into an AddedToken; an untagged object reaches the constructor as a dict and
    raises TypeError ("special token ... has to be either str or AddedToken"). We read both as
    the AddedToken. Ids are those of the plain checkpoint; sentencepiece drops the whitespace
    the unstripped tokens keep, so the encodings are equal too.
    """
    specials = as_added_tokens(HUB_SPECIALS, **({"__type": "AddedToken"} if tagged else {}))
    tokenizer = load_tokenizer(write_chinese_tokenizer(tmp_path, specials))
    assert tokenizer.added_tokens == demo_tokenizer.added_tokens
    assert encodings(tokenizer) == encodings(demo_tokenizer)
    assert (tokenizer.cls_id, tokenizer.mask_token_ids) == (demo_tokenizer.cls_id,
                                                            demo_tokenizer.mask_token_ids)


@pytest.mark.parametrize(("role", "value"), [("mask_token", 5), ("mask_token", {"lstrip": True}),
                                           ("additional_special_tokens", [["[MASK]"]])])
def test_malformed_special_token_names_the_file(tmp_path: Path, role: str, value: object) -> None:
    """A special token that is neither a string nor a `{"content": ...}` object.

    Upstream: fails to load (TypeError from `AddedToken(**value)` or the constructor, without
    naming the file). Here: a TokenizerError naming the file.
    """
    model_dir = write_chinese_tokenizer(tmp_path)
    write_json(model_dir / "special_tokens_map.json", {role: value})
    with pytest.raises(TokenizerError, match=r"special_tokens_map\.json: special token .* "
                                             r"neither a string nor an object"):
        load_tokenizer(model_dir)


# -- (4) a tokenizer_config.json without special tokens -----------------------------------
def test_special_tokens_only_in_special_tokens_map(tmp_path: Path) -> None:
    """tokenizer_config.json holds only `tokenizer_class`; special_tokens_map.json declares
    the special tokens (older hub repos).

    Upstream: the constructor sees no special tokens (GPT-2's defaults: `<|endoftext|>` as bos,
    eos and unk), then `from_pretrained` sets each role the map names: the same tokenizer as
    with a full tokenizer_config.json, `<|endoftext|>` still unstripped (bos keeps GPT-2's
    AddedToken).
    """
    added = glm10b_added_tokens()
    full = load_tokenizer(write_gpt2_tokenizer(tmp_path / "full", added))
    model_dir = write_gpt2_tokenizer(tmp_path / "map", added, specials={})
    write_json(model_dir / "special_tokens_map.json", GLM_SPECIALS)
    from_map = load_tokenizer(model_dir)
    assert encodings(from_map) == encodings(full)
    assert from_map.special_ids == full.special_ids


def test_no_special_tokens_declared_anywhere(tmp_path: Path, demo_tokenizer: GLMTokenizer) -> None:
    """glm-*-chinese files whose tokenizer_config.json holds only `tokenizer_class`, without
    special_tokens_map.json; added_tokens.json still gives GLM's tokens their ids.

    Upstream: loads with no special tokens: `cls_token_id`, `eos_token_id` and
    `mask_token_id` are None, so `tokenizer(text)` puts None where [CLS] and eos belong and
    `build_inputs_for_generation` finds no `[MASK]`; the added tokens are still split out of
    texts. Here GLM's own tokens stand in for the roles: the encodings equal the full
    checkpoint's. With no special token declared, `skip_special_tokens` skips nothing, as
    upstream.
    """
    tokenizer = load_tokenizer(write_chinese_tokenizer(tmp_path, specials={}))
    assert encodings(tokenizer) == encodings(demo_tokenizer)
    assert tokenizer.mask_token_ids == demo_tokenizer.mask_token_ids
    ids = tokenizer.encode("a [MASK] b")
    assert tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)


# -- (5) unknown keys ------------------------------------------------------------------------
def test_unknown_tokenizer_config_keys_are_ignored(tmp_path: Path,
                                                   demo_tokenizer: GLMTokenizer) -> None:
    """tokenizer_config.json and special_tokens_map.json carry keys GLM does not use.

    Upstream: the config's keys are constructor kwargs kept in `init_kwargs` and otherwise
    unused; a map key that is no special-token role just becomes an attribute.
    """
    extra = {"transformers_version": "4.26.1", "model_max_length": 1024, "use_fast": False,
             "name_or_path": "THUDM/glm-10b-chinese", "made_up_key": {"nested": [1, None]},
             "auto_map": {"AutoTokenizer": ["tokenization_glm.GLMChineseTokenizer", None]}}
    model_dir = write_chinese_tokenizer(tmp_path, {**HUB_SPECIALS, **extra})
    write_json(model_dir / "special_tokens_map.json", {**HUB_SPECIALS, "made_up_token": "@"})
    tokenizer = load_tokenizer(model_dir)
    assert encodings(tokenizer) == encodings(demo_tokenizer)


def test_unknown_config_keys_are_ignored(tmp_path: Path) -> None:
    """config.json carries keys GLMConfig does not have, and `torch_dtype`.

    Upstream: `PretrainedConfig` keeps unknown keys as attributes the model never reads;
    `torch_dtype` only names the stored dtype. Here: the same GLMConfig (torch_dtype recorded),
    and the model loads.
    """
    model_dir = make_tiny_checkpoint(tmp_path / "m")
    plain = load_config(model_dir)
    write_config(model_dir, transformers_version="4.26.1", torch_dtype="float16",
                 _name_or_path="THUDM/glm-10b", made_up_key={"nested": [1, None]},
                 auto_map={"AutoConfig": "configuration_glm.GLMConfig",
                           "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration"})
    config = load_config(model_dir)
    assert config == dataclasses.replace(plain, torch_dtype="float16")
    assert GLMModel.from_pretrained(model_dir).config == config


# -- GPT-2's own special tokens --------------------------------------------------------------
def test_gpt2_end_of_text_keeps_the_whitespace_next_to_it(tmp_path: Path) -> None:
    """Upstream: GPT2Tokenizer's constructor wraps its string bos/eos/unk/pad tokens as
    `AddedToken(lstrip=False, rstrip=False)`, so the whitespace next to a written
    `<|endoftext|>` is kept, while GLM's plain-string tokens strip it."""
    tokenizer = load_tokenizer(write_gpt2_tokenizer(tmp_path))
    text_ids = tokenizer.tokenize_ids
    assert text_ids("x <|endoftext|> y") == [*text_ids("x "), tokenizer.eos_id, *text_ids(" y")]
    assert text_ids("x [MASK] y") == [*text_ids("x"), tokenizer.token_id("[MASK]"),
                                      *text_ids("y")]
