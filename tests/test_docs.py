"""The docs: every page is linked from an index, every relative link resolves, every command shown parses with the
real CLI, and docs/python_api.md's example runs as written (on a tiny random GPT-2 and a few KB of WikiText-2)."""
import contextlib
import io
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "python_api.md"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_every_doc_is_linked_and_links_resolve():
    index = REPO / "docs" / "README.md"
    linked = {(index.parent / t).resolve() for t in LINK.findall(index.read_text())}
    linked |= {(REPO / t).resolve() for t in LINK.findall((REPO / "README.md").read_text())}
    pages = sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "README.md")
    assert len(pages) >= 10
    unlinked = [p.name for p in pages if p.resolve() not in linked]
    assert not unlinked, f"add these to docs/README.md: {unlinked}"
    for page in [index, *pages]:
        for target in LINK.findall(page.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")):
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def _shown_commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of every `knnlm ...` line in a fenced or indented code block of README, DEVELOPERS and docs/, in
    synopsis notation: `[--flag V]` optional, `a|b` alternatives (the first is taken), `...` a placeholder value."""
    found = []
    for page in [REPO / "README.md", REPO / "DEVELOPERS.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text()
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S) + re.findall(r"(?:^|\n\n)((?:    .*\n?)+)", text)
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                m = re.search(r"(?:^|\s)(?:\S*/)?knnlm\s+(.*)", line.strip().removeprefix("$ "))
                if not m:
                    continue
                shell = re.split(r" #| \| | > | && |;| &$", m.group(1))[0]  # the command, not what the shell adds
                words = shlex.split(re.sub(r"\((?:or|e\.g\.) [^)]*\)", " ", shell).replace("[", " ").replace("]", " "))
                argv = []
                for w in words:  # `...` is a flag's value after a flag, else "the other flags"; `configs/...` a path
                    if w in ("...", "…"):
                        argv += ["X"] if argv and argv[-1].startswith("--") else []
                    elif not w.startswith(","):  # `NAME[,NAME...]`: the first name is enough
                        argv.append(w.split("|")[0])
                found.append((page.name, argv))
    return found


def test_every_command_shown_in_the_docs_parses():
    """A renamed or removed flag fails here, not in a reader's shell (the same check `reproduce` runs on its recipes)."""
    from knnlm.cli import bool_values_given, build_parser

    parser, shown = build_parser(), _shown_commands()
    assert len(shown) >= 60 and any(argv[:1] == ["demo"] for _, argv in shown)
    bad = []
    for page, argv in shown:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(bool_values_given(parser, argv))  # as `main` reads it
        except SystemExit as e:
            if e.code:
                bad.append(f"{page}: knnlm {' '.join(argv)}: {(err.getvalue().strip().splitlines() or ['?'])[-1]}")
    assert not bad, "\n".join(bad)


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/python_api.md has no python example"
    return blocks[0]


def test_python_api_example_runs(tiny_gpt2_dir, wikitext_dir, tmp_path, capsys):
    text = (wikitext_dir / "valid.txt").read_text()
    (tmp_path / "train.txt").write_text(text[:6000])
    (tmp_path / "valid.txt").write_text(text[6000:8000])
    code = _example()
    values = {"MODEL": repr(str(tiny_gpt2_dir)), "TRAIN, VALID": f"{str(tmp_path / 'train.txt')!r}, "
              f"{str(tmp_path / 'valid.txt')!r}", "OUT": repr(str(tmp_path / "out"))}
    for name, value in values.items():  # the example's first three lines name the inputs: point them at test data
        code, n = re.subn(rf"^{re.escape(name)} = .*$", f"{name} = {value}", code, count=1, flags=re.M)
        assert n == 1, name
    scope = {}
    exec(compile(code, str(DOC), "exec"), scope)
    ds, metrics, mem, lls, rows = (scope[k] for k in ("ds", "metrics", "mem", "lls", "rows"))
    # the store holds one key per scored training token, and the example's objects are the real results
    assert ds.N > 1000 and ds.d == 64 and ds.key_point == "ffn_input"
    assert metrics["ppl_knnlm"] != metrics["ppl_lm"] and metrics["n_tokens"] > 300
    assert (tmp_path / "out" / "mlp").is_dir() and mem.key_point == "ffn_input"
    assert len(lls["lm"]) == len(rows) == 30 and len(lls["knn"][0.25]) == len(rows) and len(lls["mlp"][0.25]) == 30
    T = scope["ids"].shape[1]
    assert scope["knnlm_logp"].shape == scope["mlplm_logp"].shape == (T, 50257)
    assert scope["knnlm_logp"].exp().sum(-1).sub(1).abs().max() < 1e-4  # a distribution
    out = capsys.readouterr().out
    assert f"{ds.N} 64 ffn_input" in out and "LM vs kNN-LM" in out


def _map_rows(path: Path) -> dict[str, str]:
    """A doc's "## Module map" table: each name in its first column (backticked) -> the row's text."""
    section = path.read_text().split("## Module map", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            first, rest = line[2:].split(" | ", 1)
            rows.update({name: rest for name in re.findall(r"`([^`]+)`", first)})
    return rows


def test_module_maps_name_every_module():
    """README's and DEVELOPERS.md's module maps name every module, package and study folder of src/knnlm."""
    src = REPO / "src" / "knnlm"
    modules = {p.name for p in src.glob("*.py") if not p.name.startswith("__")}
    packages = {p.name + "/" for p in src.iterdir() if (p / "__init__.py").is_file()}
    studies = {p.name + "/" for p in (src / "experiments").iterdir() if (p / "__init__.py").is_file()}
    for doc in (REPO / "README.md", REPO / "DEVELOPERS.md"):
        rows = _map_rows(doc)
        named = set(rows) | {n.split("/", 1)[0] + "/" for n in rows if "/" in n}
        assert modules - named == set() and packages - named == set(), doc.name
        experiments = " ".join(text for name, text in rows.items() if name.startswith("experiments/"))
        assert {s for s in studies if f"`{s}`" not in experiments} == set(), doc.name
