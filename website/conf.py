"""Sphinx configuration of the course's site (build: see README, "O site").

Built from the repository root (`-c website`), so README.md, docs/ and notebooks/ are read where
they live and their relative links resolve as on GitHub. Notebooks are rendered from their
committed outputs, never executed.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vendor  # noqa: E402

project = "nanomoe — Do nanoGPT ao nanoMoE"
author = "nanomoe"
copyright = "nanomoe, licença MIT"
language = "pt_BR"
root_doc = "README"

extensions = ["myst_nb", "sphinx_copybutton", "sphinxcontrib.mermaid", "nanomoe_site"]

# only the course's pages: the README (home), the chapters, docs/ and the chapter index
include_patterns = ["README.md", "notebooks/[0-9][0-9]_*.ipynb", "docs/*.md", "website/capitulos.md"]
exclude_patterns = ["jupyter_execute", "website/_build", "website/_vendor", ".venv", "**/.ipynb_checkpoints"]

nb_execution_mode = "off"  # the committed, executed notebooks are the source of truth
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "html_image"]
myst_fence_as_directive = ["mermaid"]  # the README's ```mermaid blocks, as GitHub draws them
myst_heading_anchors = 3
suppress_warnings = ["mystnb.unknown_mime_type"]

# served by the site itself, fetched from the npm registry at build time (vendor.py)
html_static_path = [str(vendor.ensure_assets()), "static"]
mathjax_path = "mathjax/tex-chtml.js"
mermaid_use_local = "mermaid/mermaid.esm.min.mjs"
mermaid_fullscreen = True  # a button to see a diagram at full size
mermaid_height = "auto"  # the diagram at the width of the text, not squeezed into 500 px

html_theme = "sphinx_book_theme"
html_title = "nanomoe"
html_favicon = "static/favicon.svg"  # without one the browser asks for /favicon.ico, a 404 in the console
html_baseurl = "https://sagui-nlp.github.io/nanomoe/"
html_search_language = "pt"
html_css_files = ["nanomoe.css"]
html_js_files = ["copybutton_pt.js"]  # after copybutton.js (priority 800 > 500)
html_show_sourcelink = False
html_last_updated_fmt = None
html_theme_options = {
    "repository_url": "https://github.com/sagui-nlp/nanomoe",
    "repository_branch": "main",
    "path_to_docs": "",
    "use_repository_button": True,
    "use_download_button": True,
    "launch_buttons": {"colab_url": "https://colab.research.google.com"},
    "show_toc_level": 2,
}
# pydata-sphinx-theme logs "Got invalid theme mode" on a first visit unless a default is set
html_context = {"default_mode": "auto"}
