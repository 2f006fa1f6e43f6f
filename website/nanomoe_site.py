"""The Sphinx extension that turns the course's notebooks into a blog of chapters.

Every `notebooks/NN_*.ipynb` is a chapter (found by name, so a new chapter needs no change here);
its page gets, under the title, a one-paragraph summary (`resumos.py`), the measured time of its
default run (`nanomoe/course/notebook.py` CHAPTER_TIMES, read without importing torch), the "Abrir no
Colab" and download buttons and links to the previous and next chapters. The chapter index page
is generated from the same list, and so is an Atom feed (feedgen writes the XML).
"""

from __future__ import annotations

import ast
import html
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from docutils import nodes
from resumos import RESUMOS

REPO = "sagui-nlp/nanomoe"
COLAB = f"https://colab.research.google.com/github/{REPO}/blob/main/"
BADGE = "colab-badge.svg"
INDEX_DOC = "website/capitulos"
# CHAPTER_TIMES is written in English for the notebooks' set-up line; the site speaks Portuguese
TIME_WORDS = [("of training", "de treino"), ("for the whole notebook", "para o notebook inteiro"),
              ("tiny GPT-2 stand-in", "GPT-2 minúsculo substituto"), ("training runs", "treinos"),
              ("shared with another notebook", "dividindo a CPU com outro notebook"),
              ("the 220-run grid is read from", "a grade de 220 treinos é lida de")]


@dataclass
class Chapter:
    number: str
    docname: str  # notebooks/01_train_nanogpt
    title: str
    summary: str
    time: str

    @property
    def colab(self) -> str:
        return COLAB + self.docname + ".ipynb"

    @property
    def html(self) -> str:
        return Path(self.docname).name + ".html"


def _intro(cells: list[dict]) -> tuple[str, str]:
    """The notebook's title (first '# ' heading) and the first prose paragraph of its introduction."""
    text = "".join(cells[0]["source"]) if cells else ""
    title, paragraph = "", ""
    for block in text.split("\n\n"):
        block = block.strip()
        if block.startswith("# ") and not title:
            title = block[2:].strip()
        elif block and not block.startswith(("#", "[![", "<")) and not paragraph:
            paragraph = re.sub(r"[*`]", "", re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", block)).replace("\n", " ")
    return title, paragraph


def _times(root: Path) -> dict[str, str]:
    """CHAPTER_TIMES from nanomoe/course/notebook.py as Portuguese sentences, parsed (importing would load torch)."""
    tree = ast.parse((root / "nanomoe" / "course" / "notebook.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "CHAPTER_TIMES":
            table = ast.literal_eval(node.value)
            break
    else:
        return {}
    out = {}
    for number, where in table.items():
        cpu = re.sub(r"(\d)\.(\d)", r"\1,\2", where["cpu"])
        for english, portuguese in TIME_WORDS:
            cpu = cpu.replace(english, portuguese)
        gpu = where["gpu"] or "não medido ainda"
        out[number] = f"{cpu} numa CPU de 2 núcleos; numa GPU: {gpu}"
    return out


def chapters(root: Path) -> list[Chapter]:
    """Every notebooks/NN_*.ipynb, in order."""
    times = _times(root)
    found = []
    for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        number = path.name[:2]
        title, paragraph = _intro(json.loads(path.read_text(encoding="utf-8"))["cells"])
        found.append(Chapter(number, f"notebooks/{path.stem}", title or path.stem, RESUMOS.get(number, paragraph),
                             times.get(number, "não medido ainda")))
    return found


def _index_page(found: list[Chapter]) -> str:
    """MyST for the chapter index: every chapter with its summary, and the toctree behind the navigation."""
    lines = []
    for ch in found:
        lines += [f"## [{ch.title}](/{ch.docname}.ipynb)", "", ch.summary, "",
                  f"*Execução padrão: {ch.time}.* [Abrir no Colab]({ch.colab})", ""]
    lines += ["```{toctree}", ":hidden:", ":maxdepth: 1", ""] + [f"/{ch.docname}" for ch in found] + ["```", ""]
    return "\n".join(lines)


def on_source_read(app, docname: str, source: list[str]) -> None:
    if docname == app.config.root_doc:
        # the README is the home page: its toctree is added here, so GitHub never shows it
        source[0] += ("\n\n```{toctree}\n:hidden:\n:maxdepth: 1\n\n" + INDEX_DOC + "\ndocs/glossario\n"
                      "docs/benchmarks\n```\n")
    elif docname == INDEX_DOC:
        source[0] += "\n" + _index_page(app.env.nanomoe_chapters)


def _drop_badges(doctree: nodes.document, chapter: bool) -> None:
    """The Colab badge is an image on colab.research.google.com: offline it would not load.

    A chapter's badge paragraph goes (its header has the button); elsewhere the link keeps a word."""
    for image in list(doctree.findall(nodes.image)):
        if BADGE not in image.get("uri", ""):
            continue
        reference = image.parent
        paragraph = reference.parent
        if chapter and isinstance(paragraph, nodes.paragraph) and len(paragraph.children) == 1:
            paragraph.parent.remove(paragraph)
        else:
            reference["classes"].append("colab-link")
            reference.replace(image, nodes.Text("Abrir no Colab"))


def _text(markdown: str) -> str:
    """A title's text: no markdown emphasis or code marks."""
    return re.sub(r"[*_`]", "", markdown)


def _plain(markdown: str) -> str:
    """A title's text for raw HTML, escaped."""
    return html.escape(_text(markdown))


def _header(found: list[Chapter], i: int) -> list[nodes.Node]:
    ch = found[i]
    summary = nodes.paragraph(classes=["chapter-summary"])
    summary += nodes.Text(ch.summary)
    time = nodes.paragraph(classes=["chapter-time"])
    time += nodes.strong(text="Tempo da execução padrão: ")
    time += nodes.Text(ch.time + ".")
    nav = []
    if i > 0:
        nav.append(f'<a class="chapter-prev" href="{found[i - 1].html}">← {_plain(found[i - 1].title)}</a>')
    if i + 1 < len(found):
        nav.append(f'<a class="chapter-next" href="{found[i + 1].html}">{_plain(found[i + 1].title)} →</a>')
    name = Path(ch.docname).name
    html = (f'<div class="chapter-actions"><a class="chapter-button colab-button" href="{ch.colab}">Abrir no Colab</a>'
            f' <a class="chapter-button download-button" href="{name}.ipynb" download>Baixar o notebook (.ipynb)</a>'
            f'</div>\n<nav class="chapter-nav">{" ".join(nav)}</nav>')
    return [summary, time, nodes.raw("", html, format="html")]


def _link_notebook_paths(doctree: nodes.document, found: list[Chapter]) -> None:
    """On the home page, `notebooks/NN_x.ipynb` written as code (the chapter table) links to its page."""
    pages = {ch.docname + ".ipynb": ch.docname + ".html" for ch in found}
    for literal in list(doctree.findall(nodes.literal)):
        target = pages.get(literal.astext())
        if target is not None and not isinstance(literal.parent, nodes.reference):
            reference = nodes.reference("", "", refuri=target, internal=True)
            literal.replace_self(reference)
            reference += literal


def on_doctree_read(app, doctree: nodes.document) -> None:
    docname = app.env.docname
    found = app.env.nanomoe_chapters
    index = next((i for i, ch in enumerate(found) if ch.docname == docname), None)
    _drop_badges(doctree, chapter=index is not None)
    if docname == app.config.root_doc:
        _link_notebook_paths(doctree, found)
    if index is None:
        return
    section = doctree.next_node(nodes.section)
    title = section.next_node(nodes.title)
    at = section.index(title) + 1
    for offset, node in enumerate(_header(found, index)):
        section.insert(at + offset, node)


def on_builder_inited(app) -> None:
    app.env.nanomoe_chapters = chapters(Path(app.srcdir))


def on_page_context(app, pagename, templatename, context, doctree) -> None:
    feed = context["pathto"]("feed.xml", resource=True)
    context["metatags"] = context.get("metatags", "") + (
        f'\n<link rel="alternate" type="application/atom+xml" title="nanomoe: capítulos" href="{feed}">')


def _git_date(root: Path, path: str, first: bool) -> datetime:
    """When git says the file was added (first) or last changed; now when git does not know."""
    args = ["git", "log", "--format=%aI", "--", path]
    try:
        dates = subprocess.run(args, cwd=root, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        dates = []
    if not dates:
        return datetime.now(timezone.utc)
    return datetime.fromisoformat(dates[-1] if first else dates[0])


def write_feed(app, found: list[Chapter], out: Path) -> None:
    """An Atom feed of the chapters, newest first, written by feedgen (no hand-written XML)."""
    from feedgen.feed import FeedGenerator

    base = app.config.html_baseurl
    root = Path(app.srcdir)
    feed = FeedGenerator()
    feed.id(base)
    feed.title("nanomoe — Do nanoGPT ao nanoMoE")
    feed.subtitle("Os capítulos do curso, do nanoGPT a um modelo Mixture of Experts")
    feed.link(href=base, rel="alternate")
    feed.link(href=base + "feed.xml", rel="self")
    feed.language("pt-BR")
    for ch in found:
        entry = feed.add_entry(order="prepend")
        entry.id(base + ch.docname + ".html")
        entry.title(_text(ch.title))
        entry.link(href=base + ch.docname + ".html")
        entry.summary(ch.summary)
        entry.published(_git_date(root, ch.docname + ".ipynb", first=True))
        entry.updated(_git_date(root, ch.docname + ".ipynb", first=False))
        entry.category(term="moe")
    feed.atom_file(str(out / "feed.xml"), pretty=True)


def on_build_finished(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    out = Path(app.outdir)
    found = app.env.nanomoe_chapters
    shutil.copyfile(out / f"{app.config.root_doc}.html", out / "index.html")  # the README is the home page
    for ch in found:  # the "Baixar o notebook" button: the committed notebook next to its page
        shutil.copyfile(Path(app.srcdir) / f"{ch.docname}.ipynb", out / f"{ch.docname}.ipynb")
    (out / ".nojekyll").touch()  # GitHub Pages would hide _static/ and _sources/ otherwise
    write_feed(app, found, out)


def add_translations(app) -> None:
    """The theme's words that its own catalogs lack in Portuguese (website/locale/*.po, compiled here)."""
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po

    source = Path(__file__).resolve().parent / "locale"
    compiled = Path(__file__).resolve().parent / "_build" / "locale"
    for po in source.glob("*/LC_MESSAGES/*.po"):
        mo = compiled / po.relative_to(source).with_suffix(".mo")
        mo.parent.mkdir(parents=True, exist_ok=True)
        with po.open("rb") as f_in, mo.open("wb") as f_out:
            write_mo(f_out, read_po(f_in))
    for domain in {po.stem for po in source.glob("*/LC_MESSAGES/*.po")}:
        app.add_message_catalog(domain, str(compiled))


def setup(app):
    add_translations(app)
    app.connect("builder-inited", on_builder_inited)
    app.connect("source-read", on_source_read)
    app.connect("doctree-read", on_doctree_read)
    app.connect("html-page-context", on_page_context)
    app.connect("build-finished", on_build_finished)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
