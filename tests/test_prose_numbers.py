"""Every number with three or more significant digits in a chapter's prose (the markdown cells of
`notebooks/NN_*.ipynb`) must be traceable: it appears in that notebook's outputs, in its code cells
(a constant the chapter sets), in a committed results file (`docs/results/NN/...`,
the chapter's section of `docs/benchmarks.md`), or on the
chapter's short list of external figures with their source (`docs/external_numbers.toml`).

A prose number matches a source number when they are equal at the prose's precision: "1,06" matches
an output 1.0612, "614 mil" matches 614400, "1,84 milhão" matches 1843200, "3,2e-5" matches
3.21e-05. Prose is pt-br (decimal comma, thin-space thousands); outputs are Python's (decimal
point, comma thousands); both spellings are read on both sides. A number quoted from an older run
has no match and fails the test, which lists it with its cell index.

Chapters listed in ``PENDING`` are still being rewritten (their prose and outputs change after this
test was written); the coordinator removes them from the list once their final text is in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXTERNAL = REPO / "docs" / "external_numbers.toml"
RESULTS = REPO / "docs" / "results"
BENCHMARKS = REPO / "docs" / "benchmarks.md"  # measured side by side by scripts/bench_*.py
PENDING: set[str] = set()  # chapters under rewrite at the time of writing; the coordinator tunes this

_SCALE = {
    "mil": 1e3, "k": 1e3, "K": 1e3,
    "milhão": 1e6, "milhões": 1e6, "M": 1e6,
    "bilhão": 1e9, "bilhões": 1e9, "bi": 1e9, "B": 1e9, "G": 1e9,
    "tri": 1e12, "trilhão": 1e12, "trilhões": 1e12, "T": 1e12,
}
_SPACES = "\u202f\u2009\u00a0 "
# A number: digits with optional thousands groups (space, thin space, comma or dot) and an optional
# decimal part, an optional exponent (1e-3, 3,2×10⁻⁵) and an optional scale word or suffix.
_NUM = re.compile(
    r"(?<![\w.,§\-])"  # not glued to a word ("H100", "GPT-2", "V3"), a section (§3.2) or a range
    r"(?P<mant>\d{1,3}(?:[\u202f\u2009\u00a0 ]\d{3})+(?:,\d+)?|\d+(?:[.,]\d+)*)"
    r"(?P<exp>[eE][-−+]?\d+|\s?×\s?10[⁻⁺]?[⁰¹²³⁴⁵⁶⁷⁸⁹]+)?"
    r"(?:\s?(?P<scale>milhões|milhão|bilhões|bilhão|trilhões|trilhão|mil|bi|tri|[kKMBGT])(?![\w]))?"
)
_SUPER = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")


def _strip_markdown(text: str) -> str:
    """Drop what is not prose: code blocks, inline code, URLs, link targets, HTML tags, arXiv ids."""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "] ", text)
    text = re.sub(r"https?://\S+", " ", text)
    text = re.sub(r"<[^>]+>", " ", text)
    text = re.sub(r"arXiv[: ]\s*\d{4}\.\d{4,5}", " ", text)
    return text


def _sig_digits(digits: str) -> int:
    """Significant digits of a written mantissa (digits only, decimal part kept in order)."""
    return len(digits.lstrip("0").rstrip("0")) if "." not in digits else len(digits.replace(".", "").lstrip("0"))


def _readings(mant: str, pt: bool) -> list[tuple[float, int]]:
    """(value, decimals) readings of a written mantissa. pt=True prefers pt-br (comma decimal)."""
    m = re.sub(f"[{_SPACES}]", "", mant)
    out = []
    seps = set(re.findall(r"[.,]", m))
    if not seps:
        return [(float(m), 0)]
    for dec in (",", ".") if pt else (".", ","):
        thou = "." if dec == "," else ","
        parts = m.split(dec)
        if len(parts) > 2:
            continue
        intpart = parts[0]
        groups = intpart.split(thou)
        if len(groups) > 1 and not all(len(g) == 3 for g in groups[1:]):
            continue
        frac = parts[1] if len(parts) == 2 else ""
        if thou in frac:
            continue
        value = float("".join(groups) + ("." + frac if frac else ""))
        out.append((value, len(frac)))
    return out


def _exponent(exp: str | None) -> float:
    if not exp:
        return 1.0
    exp = exp.replace("−", "-")
    if exp[0] in "eE":
        return 10.0 ** int(exp[1:])
    power = exp.split("10", 1)[1].translate(_SUPER)
    return 10.0 ** int(power)


def prose_numbers(text: str) -> list[tuple[str, float, int, float]]:
    """Numbers of 3+ significant digits in pt-br prose: (as written, value, decimals, scale)."""
    found = []
    for m in _NUM.finditer(_strip_markdown(text)):
        mant, exp, scale = m.group("mant"), m.group("exp"), m.group("scale")
        readings = _readings(mant, pt=True)
        if not readings:
            continue
        value, decimals = readings[0]
        digits = re.sub(r"\D", "", mant)
        sig = len(digits.lstrip("0")) if decimals else len(digits.lstrip("0").rstrip("0"))
        if sig < 3:
            continue
        if not decimals and not exp and not scale and 1900 <= value <= 2030 and len(digits) == 4:
            continue  # a year (a paper's date)
        mult = _exponent(exp) * _SCALE.get(scale or "", 1.0)
        found.append((m.group(0).strip(), value, decimals, mult))
    return found


def source_values(text: str) -> set[float]:
    """Every reading of every number in printed output or a results file (Python or pt-br style)."""
    values = set()
    text = re.sub(r"(?<![\w.])[−-](?=\d)", " ", text)  # a leading minus sign ("| −0,1770"): only |value| counts
    for m in _NUM.finditer(text.replace("−", "-")):
        mult = _exponent(m.group("exp")) * _SCALE.get(m.group("scale") or "", 1.0)
        for pt in (False, True):
            for value, _ in _readings(m.group("mant"), pt=pt):
                values.add(value * mult)
                if m.group("scale"):
                    values.add(value)
    # also bare numbers glued to words or signs in logs ("step=40", "loss:2.3464", "-0.005")
    for m in re.finditer(r"\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", text):
        values.add(float(m.group(0)))
    return values


def matches(value: float, decimals: int, mult: float, sources: set[float], percent: bool = False) -> bool:
    """True when some source, scaled like the prose and rounded to its precision, equals it."""
    half = 0.5 * 10.0 ** -decimals + 1e-9 * max(1.0, value)
    for s in sources:
        for cand in (abs(s) / mult, abs(s) * 100 / mult if percent else None):
            if cand is not None and abs(cand - value) <= half:
                return True
    return False


def _notebook_parts(path: Path) -> tuple[list[tuple[int, str]], str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    prose, sources = [], []
    for i, cell in enumerate(nb["cells"]):
        src = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            prose.append((i, src))
            continue
        sources.append(src)
        for out in cell.get("outputs", []):
            if "text" in out:
                sources.append("".join(out["text"]))
            for kind, data in out.get("data", {}).items():
                if kind.startswith("text/"):
                    sources.append("".join(data) if isinstance(data, list) else str(data))
    return prose, "\n".join(sources)


def _benchmark_section(chapter: str) -> str:
    """The '## Chapter NN' section of docs/benchmarks.md (up to the next '## ' heading)."""
    if not BENCHMARKS.is_file():
        return ""
    text = BENCHMARKS.read_text(encoding="utf-8")
    m = re.search(rf"^## Chapter {chapter}\b.*?(?=^## |\Z)", text, flags=re.M | re.S)
    return m.group(0) if m else ""


def _results_text(chapter: str) -> str:
    """The chapter's committed results (docs/results/NN/) and the committed benchmarks page."""
    folder = RESULTS / chapter
    texts = [_benchmark_section(chapter)]
    if not folder.is_dir():
        return "\n".join(texts)
    for p in sorted(folder.rglob("*")):
        if p.suffix in {".json", ".md", ".csv", ".txt", ".toml", ".log"} and p.is_file():
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(texts)


def external_numbers(chapter: str) -> str:
    """The chapter's external figures (papers, spec sheets) as text, each with its source."""
    if not EXTERNAL.is_file():
        return ""
    data = tomllib.loads(EXTERNAL.read_text(encoding="utf-8"))
    entries = [e for e in data.get("number", []) if e["chapter"] == chapter]
    for e in entries:
        assert e.get("source"), f"docs/external_numbers.toml: {e['number']!r} (chapter {chapter}) has no source"
    return "\n".join(n for e in entries for n in str(e["number"]).split())  # "1.9765 2.0076": one per word


def stale_numbers(path: Path) -> list[str]:
    """Prose numbers of the notebook that match nothing, as 'cell N: number'."""
    chapter = path.stem[:2]
    prose, text = _notebook_parts(path)
    sources = source_values(text + "\n" + _results_text(chapter) + "\n" + external_numbers(chapter))
    missing = []
    for i, src in prose:
        for written, value, decimals, mult in prose_numbers(src):
            percent = "%" in src[src.find(written) : src.find(written) + len(written) + 2]
            if not matches(value, decimals, mult, sources, percent=percent):
                missing.append(f"cell {i}: {written}")
    return missing


# --- the matcher itself -------------------------------------------------------------------------


def test_matcher_reads_pt_br_prose_and_python_outputs():
    assert [(w, v, d) for w, v, d, _ in prose_numbers("val 2,3464 e 825\u202f856 parâmetros")] == [
        ("2,3464", 2.3464, 4),
        ("825\u202f856", 825856.0, 0),
    ]
    assert prose_numbers("2000 passos, 0,041 nats, GPT-2, H100, em 2017, §3.2.2") == []  # < 3 digits, names
    src = source_values("step 40 | loss 2.3464 | 825,856 params | 614,400 tokens | 1.843e+06 | 3.45M")
    for prose in ("2,35", "2,3464", "825\u202f856", "614 mil", "1,84 milhão", "3,45 milhões", "2,346"):
        (_, value, decimals, mult), = prose_numbers(prose)
        assert matches(value, decimals, mult, src), prose
    signed = source_values("| −0,0596 ± 0,1641 | −0,1770 a +0,0578 | média −0,0556, IC | lr 1e-3 | GPT-2")
    for prose in ("−0,0596", "0,1770", "+0,0578", "−0,0556"):
        (_, value, decimals, mult), = prose_numbers(prose)
        assert matches(value, decimals, mult, signed), prose
    assert 1e-3 in signed  # an exponent's minus is not a sign


def test_matcher_fails_on_a_stale_number():
    src = source_values("W=4: 19,423 tokens/s | W=1: 26,164 tokens/s | loss 3.2263")
    for stale in ("6461 tokens/s", "3553", "2,37", "3,2264 e", "19\u202f424"):
        (_, value, decimals, mult), = prose_numbers(stale)
        assert not matches(value, decimals, mult, src), stale
    (_, value, decimals, mult), = prose_numbers("19\u202f423 tokens/s")
    assert matches(value, decimals, mult, src)


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_prose_numbers_come_from_outputs_results_or_sources(nb_path):
    if nb_path.stem[:2] in PENDING:
        pytest.skip(f"chapter {nb_path.stem[:2]} is being rewritten; remove it from PENDING when final")
    missing = stale_numbers(nb_path)
    assert not missing, (
        f"{nb_path.name}: numbers in the prose that match no output, code constant, docs/results/ file "
        f"or docs/external_numbers.toml entry (quote the current output, or add the source): {missing}"
    )
