"""Sphinx configuration of the zkd_jax documentation.

Build (offline, warnings are errors):
``python -m sphinx -W --keep-going -b html docs docs/_build/html``.

Why Sphinx: the docstrings are Google style and autodoc + napoleon read them where they are, so
the API reference cannot drift from the code; MyST keeps every page Markdown, like the README.
The configs page's tables are generated at build time from ``zkd_jax.configs`` (``_ext``).
"""

from __future__ import annotations

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DOCS))
sys.path.insert(0, os.path.join(DOCS, "_ext"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "zkd_jax"
author = "zkd_jax authors"
copyright = "2026, zkd_jax authors"  # noqa: A001 (Sphinx's name)
release = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "zkd_configs",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]

napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": False}

html_theme = "furo"
html_title = "zkd_jax"
html_static_path: list[str] = []
