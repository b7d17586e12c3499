"""Sliding windows: every target once, the longest context allowed, and the datastore row mapping."""
import json
import numpy as np
import torch
import pytest

from knnlm.config import resolve
from knnlm.corpus import CorpusArgs, count_targets, windows
from knnlm.errors import KnnlmError


@pytest.mark.parametrize("n, block, stride", [(10, 4, 2), (10, 4, 4), (7, 8, 3), (100, 16, 5), (2, 4, 2), (33, 5, 1)])
def test_every_target_scored_once(n, block, stride):
    wins = windows(np.array([0, n]), block, stride)
    targets = [t for w in wins for t in range(w.first_target, w.end)]
    assert targets == list(range(1, n))
    assert count_targets(wins) == n - 1
    for w in wins:
        assert w.end - w.start <= block
        assert w.start < w.first_target <= w.end
    # the row of target t is t - 1 in a single document
    assert all(w.row == w.first_target - 1 for w in wins)


def test_longest_context():
    # block 4, stride 2 over 10 tokens: windows [0,4) [2,6) [4,8) [6,10); targets 1-3, 4-5, 6-7, 8-9
    wins = windows(np.array([0, 10]), 4, 2)
    assert [(w.start, w.end, w.first_target) for w in wins] == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]


def test_documents_are_windowed_separately():
    wins = windows(np.array([0, 3, 3, 8]), 4, 2)  # docs of 3, 0 and 5 tokens
    targets = [t for w in wins for t in range(w.first_target, w.end)]
    assert targets == [1, 2, 4, 5, 6, 7]
    rows = [w.row + i for w in wins for i in range(w.n_targets)]
    assert rows == list(range(6))
    assert all(w.start >= 3 for w in wins if w.first_target >= 4)  # no context crosses a document start


def test_bad_stride():
    with pytest.raises(KnnlmError, match="--stride"):
        resolve(CorpusArgs, {"block_size": 4, "stride": 8})
    with pytest.raises(KnnlmError, match="--block_size"):
        CorpusArgs(block_size=4096).resolved_window(1024)


def test_pieced_tokenization_equals_one_string(tiny_lm, wikitext_dir, tmp_path, monkeypatch):
    """A text file tokenized in small pieces gives exactly the tokens of tokenizing it as one string."""
    from knnlm import corpus

    text = (wikitext_dir / "valid.txt").read_text(encoding="utf-8")[:60_000]
    path = tmp_path / "part.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(corpus, "_CHUNK_CHARS", 2_000)  # 30 pieces, so many boundaries fall inside words
    out = corpus.tokenize_to_file(tiny_lm, CorpusArgs(train_file=str(path)), "train", tmp_path / "tokens.i32")
    assert out.tokens.tolist() == tiny_lm.encode(text)
    assert out.doc_starts.tolist() == [0, len(out.tokens)]


def test_pad_right_hand_values():
    """The one right-padding (batch_inputs, collate_causal, Macondo scoring and the hurdle's batches use it)."""
    from knnlm.corpus import pad_right
    from knnlm.train import collate_causal

    ids, mask = pad_right([[5, 6, 7], np.array([8], dtype=np.int32), []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]] and mask.dtype == torch.long
    batch = collate_causal([[5, 6, 7], [8]], pad_id=9)
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]] and batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]


@pytest.mark.parametrize("text,what", [('[{"text": "a b"}, {"text": "c"}]\n', "is a list"), ("7\n", "is a number")])
def test_a_json_file_that_is_not_json_lines_says_so(tmp_path, text, what):
    """A whole-file JSON array (valid JSON, but not one object per line) was reported as a row with no 'text' field."""
    from knnlm.corpus import _jsonl_texts

    path = tmp_path / "doc.json"
    path.write_text(text)
    with pytest.raises(KnnlmError, match=rf"^--train_file: .*doc.json:1 {what}, not a JSON object; write one JSON object "
                                         r"per line \(JSON Lines\)"):
        list(_jsonl_texts(path, "text", "--train_file"))


@pytest.mark.parametrize("layout", ["metaspace-first", "metaspace-always", "prepend-normalizer"])
def test_pieced_tokenization_equals_one_string_when_the_tokenizer_marks_a_strings_start(wikitext_dir, tmp_path,
                                                                                          monkeypatch, layout):
    """SentencePiece-style tokenizers (Llama-2, Mistral: a '▁' prepended to every string) gave every piece after the
    first a spurious word start (the legacy layout: 6,277 tokens for one string's 6,272); each piece is now read after
    the text of the last tokens emitted. Such a tokenizer's token files carry a key field, so older ones are rebuilt."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from knnlm import corpus

    text = (wikitext_dir / "valid.txt").read_text(encoding="utf-8")[:20_000]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=layout == "prepend-normalizer"))
    if layout == "prepend-normalizer":  # the legacy Llama-2 / Mistral-7B tokenizer.json
        bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=layout.split("-")[1])
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    path = tmp_path / "part.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(corpus, "_CHUNK_CHARS", 997)  # 20 pieces
    out = corpus.tokenize_to_file(corpus.TextEncoder(tok), CorpusArgs(train_file=str(path)), "train",
                                  tmp_path / "tokens.i32")
    assert out.tokens.tolist() == tok(text)["input_ids"]


@pytest.mark.parametrize("chunk", [97, 997])
def test_pieced_tokenization_of_characters_of_several_byte_tokens_equals_one_string(tmp_path, monkeypatch, chunk):
    """A character of several byte tokens (CJK, emoji under GPT-2's byte-level BPE) at a piece boundary: the tokens
    before the cut held part of it and the carried text all of it, so its first bytes came twice (5,624 tokens for one
    string's 5,564 at 97-character pieces). And a text shorter than the carried tokens kept no BOS under a tokenizer
    that adds one (a Llama-style template here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from knnlm import corpus
    from knnlm.assets import gpt2_tokenizer_dir

    text = "".join(f"line {i} of the text 日本語のテキスト、絵文字🤖🎉 café naïve. " for i in range(120))
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))  # (as Llama / Mistral: bytes for rare chars)
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    llama = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    monkeypatch.setattr(corpus, "_CHUNK_CHARS", chunk)
    for tok in (AutoTokenizer.from_pretrained(gpt2_tokenizer_dir()), llama):
        for i, body in enumerate((text, "short 日本")):
            path = tmp_path / f"{i}.txt"
            path.write_text(body, encoding="utf-8")
            got = np.concatenate([ids for ids, _ in corpus._encode_long_text(tok, path, True)]).tolist()
            assert got == tok(body)["input_ids"]


@pytest.mark.parametrize("chunk", [1, 2, 1 << 18])  # the BOM's 3 bytes split over pieces, or in one
def test_a_utf8_bom_opening_a_text_or_jsonl_file_is_not_text(tiny_lm, tmp_path, monkeypatch, chunk):
    """A BOM is dropped as the table and `datasets` readers drop it: it was 3 tokens before a text file's first word,
    and a JSONL file's first row was refused as not JSON (with --skip_bad_rows: dropped, its text lost). A token file
    made with the BOM read as text is made again."""
    import json

    from knnlm import corpus

    text = " = Valkyria Chronicles = \n\n Senjō no Valkyria 3 is a game . \n"
    docs = ["Homarus gammarus is a lobster .", "It is blue ."]
    (tmp_path / "a.txt").write_text("\ufeff" + text, encoding="utf-8")
    (tmp_path / "a.jsonl").write_text("\ufeff" + "".join(json.dumps({"text": d}) + "\n" for d in docs),
                                      encoding="utf-8")
    monkeypatch.setattr(corpus, "_CHUNK_CHARS", chunk)
    eos = tiny_lm.eos_token_id

    def tokens(name, **kw):
        return corpus.tokenize_to_file(tiny_lm, CorpusArgs(train_file=str(tmp_path / name), **kw), "train",
                                       tmp_path / f"{name}-{len(kw)}.i32").tokens.tolist()

    expect_text = tiny_lm.encode(text)
    assert tokens("a.txt") == expect_text
    assert len(expect_text) == 22 and len(tiny_lm.encode("\ufeff" + text)) == 25
    expect_rows = tiny_lm.encode(docs[0]) + [eos] + tiny_lm.encode(docs[1])
    assert tokens("a.jsonl") == expect_rows
    assert tokens("a.jsonl", skip_bad_rows=True) == expect_rows
    assert corpus.skipped_rows(tmp_path / "a.jsonl-1.i32") == 0


def test_a_token_file_of_a_bom_read_as_text_is_made_again(tiny_lm, tmp_path):
    from knnlm import corpus

    path = tmp_path / "a.txt"
    path.write_text("\ufeffHello world .\n", encoding="utf-8")
    args, out = CorpusArgs(train_file=str(path)), tmp_path / "tokens.i32"
    made = corpus.tokenize_to_file(tiny_lm, args, "train", out)
    assert made.tokens.tolist() == tiny_lm.encode("Hello world .\n")
    record = corpus.token_record_path(out)
    old = json.loads(record.read_text())  # as an earlier knnlm recorded it: no "bom" in the key, the BOM's tokens in
    del old["key"]["bom"]
    stale = tiny_lm.encode("\ufeffHello world .\n")
    np.asarray(stale, np.int32).tofile(out)
    np.asarray([0, len(stale)], np.int64).tofile(out.with_name(out.name + ".docs"))
    old["n_tokens"] = len(stale)
    record.write_text(json.dumps(old))
    again = corpus.tokenize_to_file(tiny_lm, args, "train", out)
    assert again.replaced and again.tokens.tolist() == tiny_lm.encode("Hello world .\n")


@pytest.mark.parametrize("name, compress, fmt", [("a.txt.gz", "gzip", "gzip"), ("a.jsonl.gz", "gzip", "gzip"),
                                                 ("a.txt.bz2", "bz2", "bzip2"), ("a.txt.xz", "lzma", "xz")])
@pytest.mark.parametrize("errors", ["strict", "replace"])
def test_a_compressed_corpus_is_refused_naming_its_format(tiny_lm, tmp_path, name, compress, fmt, errors):
    """No reader decompresses: a .gz was 'not UTF-8 at byte 1' with the advice to pass --encoding_errors replace,
    which tokenized the compressed bytes as text (the review's corpus: 5,968 tokens of noise for 4,235)."""
    import importlib

    from knnlm import corpus
    from knnlm.errors import KnnlmError

    text = '{"text": "Homarus gammarus is a lobster ."}\n' * 50
    (tmp_path / name).write_bytes(importlib.import_module(compress).compress(text.encode()))
    args = CorpusArgs(train_file=str(tmp_path / name), encoding_errors=errors)
    with pytest.raises(KnnlmError, match=rf"^--train_file: .*{name} is {fmt}-compressed, .*decompress it first"):
        corpus.tokenize_to_file(tiny_lm, args, "train", tmp_path / "tokens.i32")
    with pytest.raises(KnnlmError, match=f"is {fmt}-compressed"):
        args.require("train")
    assert not (tmp_path / "tokens.i32").exists()


def test_a_text_opening_like_a_compressed_files_magic_is_text(tiny_lm, tmp_path):
    from knnlm import corpus

    for text in ("BZh is no bzip2 file .\n", "PK is no zip file .\n"):
        (tmp_path / "a.txt").write_text(text)
        out = corpus.tokenize_to_file(tiny_lm, CorpusArgs(train_file=str(tmp_path / "a.txt")), "train",
                                      tmp_path / "tokens.i32")
        assert out.tokens.tolist() == tiny_lm.encode(text)


def test_documents_joined_with_eos_an_empty_one_adds_its_own_but_before_the_first_text(tiny_lm, tmp_path):
    """README, Corpora: documents are joined with EOS; an empty document adds an EOS of its own, except before the
    first text (hand-computed streams of three JSONL documents)."""
    import json

    from knnlm import corpus
    from knnlm.corpus import CorpusArgs

    a, b, eos = tiny_lm.encode("one two"), tiny_lm.encode(" three"), tiny_lm.eos_token_id
    streams = {}
    for i, docs in enumerate((["one two", " three"], ["", "one two", " three"], ["one two", "", " three"],
                              ["one two", " three", ""])):
        path = tmp_path / f"{i}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        streams[i] = corpus.tokenize_to_file(tiny_lm, CorpusArgs(train_file=str(path)), "train",
                                             tmp_path / f"{i}.i32").tokens.tolist()
    assert streams == {0: a + [eos] + b, 1: a + [eos] + b, 2: a + [eos, eos] + b, 3: a + [eos] + b + [eos]}


def test_a_datasets_builder_name_without_data_files_names_the_flags_that_give_them(tiny_lm, tmp_path):
    """Before: `--dataset_name json` (or text, csv, parquet) was "cannot load 'json' ...: An error occurred while
    generating the dataset": datasets' builders for local files need data files, which --dataset_name cannot give."""
    from knnlm import corpus
    from knnlm.corpus import CorpusArgs
    from knnlm.errors import KnnlmError

    for name in ("json", "text"):
        with pytest.raises(KnnlmError, match=rf"--dataset_name: '{name}' is datasets' builder .* --train_file"):
            corpus.tokenize_to_file(tiny_lm, CorpusArgs(dataset_name=name), "train", tmp_path / f"{name}.i32")
