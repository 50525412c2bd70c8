"""The three GLM tokenizer kinds, built from small local vocabularies, and the upstream
whitespace rule next to special tokens (spec §5.3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from pipeline.glm.tokenization import (
    GLMBertTokenizer,
    GLMChineseTokenizer,
    GLMGPT2Tokenizer,
    TokenizerError,
    load_tokenizer,
)
from tests.fixtures import fixture_manifest

CORPUS = [
    "Tsinghua University is located in Beijing and was founded in 1911.",
    "The capital of France is Paris. The file is opened in read mode.",
    "Question: what does the sort method do? Answer: it sorts the list in place.",
    "Blank infilling models read the context in both directions, don't they?",
] * 20
GLM_SPECIALS = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "cls_token": "[CLS]", "mask_token": "[MASK]", "sep_token": "[SEP]",
                "additional_special_tokens": ["<|startofpiece|>", "<|endofpiece|>", "[gMASK]",
                                              "[sMASK]"]}


def write_gpt2_tokenizer(model_dir: Path, added_tokens: dict[str, int] | None = None,
                         specials: dict | None = None, in_vocab: tuple[str, ...] = ()) -> Path:
    """A byte-level BPE trained here, saved as GPT-2's vocab.json + merges.txt. `specials`
    (default GLM_SPECIALS) go to tokenizer_config.json; `in_vocab` become vocabulary entries."""
    model_dir.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", *in_vocab],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.model.save(str(model_dir))
    config = {"tokenizer_class": "GLMGPT2Tokenizer",
              **(GLM_SPECIALS if specials is None else specials)}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    if added_tokens:
        (model_dir / "added_tokens.json").write_text(json.dumps(added_tokens))
    return model_dir


def write_bert_tokenizer(model_dir: Path) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "capital", "of", "france",
             "is", "paris", ".", ",", "?", "'", "s", "t", "don", "un", "##believ", "##able",
             "cafe", "bei", "##jing"]
    (model_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    config = {"tokenizer_class": "GLMBertTokenizer", "do_lower_case": True,
              "eos_token": "[PAD]", "pad_token": "[PAD]", "cls_token": "[CLS]",
              "mask_token": "[MASK]", "sep_token": "[SEP]", "unk_token": "[UNK]",
              "additional_special_tokens": ["<|startofpiece|>", "<|endofpiece|>"]}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return model_dir


@pytest.mark.parametrize("check", fixture_manifest().get("tokenizer_checks", []),
                         ids=lambda c: c["text"][:20])
def test_chinese_tokenizer_matches_upstream(check: dict, tokenizer) -> None:
    assert isinstance(tokenizer, GLMChineseTokenizer)
    ids = tokenizer.encode(check["text"])
    assert ids == check["input_ids"]
    assert tokenizer.decode(ids) == check["decoded"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == check["decoded_skip_special"]


def test_chinese_special_ids_come_from_added_tokens(tokenizer) -> None:
    expected = fixture_manifest()["tokenizer"]
    assert (tokenizer.cls_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.sop_id,
            tokenizer.eop_id) == (expected["cls"], expected["eos"], expected["pad"],
                                  expected["sop"], expected["eop"])
    assert tokenizer.mask_token_ids == [expected["mask"], expected["smask"], expected["gmask"]]
    assert tokenizer.encode("[UNK]") == [expected["cls"], expected["unk"], expected["eos"]]


def test_gpt2_tokenizer_special_tokens_and_whitespace(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(write_gpt2_tokenizer(tmp_path))
    assert isinstance(tokenizer, GLMGPT2Tokenizer)
    base = len(tokenizer.vocab)
    # without added_tokens.json the hub appends them after the BPE vocabulary in this order
    assert [tokenizer.token_id(t) for t in ("[SEP]", "[CLS]", "[MASK]", "<|startofpiece|>",
                                            "<|endofpiece|>", "[gMASK]", "[sMASK]")] == list(
        range(base, base + 7))
    assert tokenizer.eos_id == tokenizer.vocab["<|endoftext|>"]
    text_ids = tokenizer.tokenize_ids
    ids = tokenizer.encode("Tsinghua University is located in [MASK].")
    assert ids == [tokenizer.cls_id, *text_ids("Tsinghua University is located in"),
                   tokenizer.token_id("[MASK]"), *text_ids("."), tokenizer.eos_id]
    # the text after a special token loses its leading space: "[MASK] ." encodes "." not " ."
    assert tokenizer.encode("in [MASK] .") == tokenizer.encode("in[MASK].")
    assert text_ids(" .") != text_ids(".")
    # <|endoftext|> belongs to the BPE vocabulary, not to the added tokens, so 4.26 decodes it
    # inline with the text before it; added tokens are joined with spaces
    assert tokenizer.decode(ids) == "[CLS] Tsinghua University is located in [MASK].<|endoftext|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == (
        "Tsinghua University is located in.")


def test_gpt2_text_encoding_equals_transformers(tmp_path: Path) -> None:
    """Cross-check the BPE text path with transformers' own GPT-2 tokenizer."""
    transformers = pytest.importorskip("transformers")
    model_dir = write_gpt2_tokenizer(tmp_path)
    reference = transformers.GPT2TokenizerFast(vocab=str(model_dir / "vocab.json"),
                                               merges=str(model_dir / "merges.txt"))
    tokenizer = load_tokenizer(model_dir)
    for text in [*CORPUS[:4], "  leading and   inner spaces", "naïve café, 北京 ünïcode\t!"]:
        ids = tokenizer.tokenize_ids(text)
        assert ids == reference.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == reference.decode(ids, clean_up_tokenization_spaces=True)


def test_gpt2_added_tokens_file_wins(tmp_path: Path) -> None:
    base = 400
    added = {"[SEP]": base + 4, "[CLS]": base + 2, "[MASK]": base + 3, "[UNK]": base + 5,
             "<|startofpiece|>": base, "<|endofpiece|>": base + 1, "[gMASK]": base + 6,
             "[sMASK]": base + 7}
    tokenizer = load_tokenizer(write_gpt2_tokenizer(tmp_path, added))
    assert (tokenizer.sop_id, tokenizer.eop_id, tokenizer.cls_id) == (base, base + 1, base + 2)
    assert tokenizer.mask_token_ids == [base + 3, base + 7, base + 6]
    assert len(tokenizer) == base + 8


def test_bert_tokenizer(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(write_bert_tokenizer(tmp_path))
    assert isinstance(tokenizer, GLMBertTokenizer)
    vocab = tokenizer.vocab
    assert tokenizer.mask_token_ids == [vocab["[MASK]"]]  # BERT GLMs know only [MASK]
    assert (tokenizer.sop_id, tokenizer.eop_id) == (len(vocab), len(vocab) + 1)
    ids = tokenizer.encode("The Capital of FRANCE is [MASK] . Unbelievable!")
    assert ids == [vocab[t] for t in ("[CLS]", "the", "capital", "of", "france", "is", "[MASK]",
                                      ".", "un", "##believ", "##able", "[UNK]", "[SEP]")]
    assert tokenizer.decode(ids) == (
        "[CLS] the capital of france is [MASK]. unbelievable [UNK] [SEP]")
    assert tokenizer.decode(ids, skip_special_tokens=True) == (
        "the capital of france is. unbelievable")
    assert tokenizer.encode("Café") == [vocab["[CLS]"], vocab["cafe"], vocab["[SEP]"]]
    # the original repo's sequential procedure appends eos ([PAD] here), the hub [SEP]
    assert tokenizer.encode_original("paris [MASK]")[-1] == vocab["[PAD]"]


def test_round_trip_of_plain_text(tmp_path: Path, demo_tokenizer) -> None:
    gpt2 = load_tokenizer(write_gpt2_tokenizer(tmp_path))
    for text in CORPUS[:4]:
        assert gpt2.decode(gpt2.tokenize_ids(text)) == text
    chinese = demo_tokenizer  # the fixture model's sentencepiece files, shipped in the package
    assert chinese.decode(chinese.tokenize_ids("北京是中国的首都")) == "北京是中国的首都"


def test_missing_vocabulary_files(tmp_path: Path) -> None:
    model_dir = write_gpt2_tokenizer(tmp_path)
    (model_dir / "merges.txt").unlink()
    with pytest.raises(TokenizerError, match=r"merges\.txt: missing"):
        load_tokenizer(model_dir)
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: missing"):
        load_tokenizer(tmp_path / "nowhere")
