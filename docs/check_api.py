"""Checks that the built API page documents every public function of ``zkd_jax`` and
``zkd_jax.losses``: ``python docs/check_api.py docs/_build/html`` (run by CI after the build)."""

from __future__ import annotations

import pathlib
import sys

import zkd_jax
import zkd_jax.losses


def missing(html_dir: str) -> list[str]:
    """The public names without an entry in ``api.html``."""
    page = (pathlib.Path(html_dir) / "api.html").read_text(encoding="utf-8")
    names = sorted(set(zkd_jax.__all__) | set(zkd_jax.losses.__all__))
    return [n for n in names if f'id="zkd_jax.losses.{n}"' not in page]


if __name__ == "__main__":
    absent = missing(sys.argv[1] if len(sys.argv) > 1 else "docs/_build/html")
    if absent:
        print(f"check_api: not in the API reference: {', '.join(absent)}", file=sys.stderr)
        sys.exit(1)
    print(f"check_api: all {len(zkd_jax.__all__)} public functions are documented")
