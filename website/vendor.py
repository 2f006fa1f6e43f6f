"""The site's browser-side libraries, fetched from the npm registry at build time (never committed).

MathJax (math) and Mermaid (the README's diagrams) are served from the site itself, so the built
site works offline and no page asks a CDN for anything. Each package is a pinned version whose
tarball must match the sha512 the registry publishes; `npm pack` (the ordinary npm client) fetches
it once into `website/_vendor/` (git-ignored), and only the files the pages load are extracted.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "_vendor"
STATIC = CACHE / "static"  # added to html_static_path: its folders land in the site's _static/

# name, version, the registry's dist.integrity, the tarball members to keep -> folder under STATIC
PACKAGES = [
    ("mermaid", "11.12.1",
     "sha512-UlIZrRariB11TY1RtTgUWp65tphtBv4CSq7vyS2ZZ2TgoMjs2nloq+wFqxiwcxlhHUvs7DPGgMjs2aeQxz5h9g==",
     ("package/dist/mermaid.esm.min.mjs", "package/dist/chunks/mermaid.esm.min/"), "mermaid"),
    ("mathjax", "3.2.2",
     "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw==",
     ("package/es5/tex-chtml.js", "package/es5/output/chtml/fonts/woff-v2/", "package/es5/input/tex/extensions/"),
     "mathjax"),
]


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def _tarball(name: str, version: str, integrity: str) -> Path:
    """The package's tarball from the cache, or fetched with `npm pack` and checked against the pin."""
    path = CACHE / f"{name}-{version}.tgz"
    if not path.exists():
        if shutil.which("npm") is None:
            sys.exit(f"site: {name} {version} is fetched with npm at build time: install Node.js (npm) and retry")
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", f"{name}@{version}", "--pack-destination", str(CACHE), "--silent"],
                       check=True, stdout=subprocess.DEVNULL)
    if _integrity(path) != integrity:
        path.unlink()
        sys.exit(f"site: {path.name} does not match the pinned sha512; it was removed, build again to refetch it")
    return path


def _extract(tgz: Path, keep: tuple[str, ...], dest: Path) -> None:
    """Extract the kept members, paths relative to their common 'package/<dir>/' prefix."""
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith(keep) or member.name.endswith(".map"):
                continue
            # package/dist/x.mjs -> x.mjs, package/es5/output/... -> output/...
            relative = Path(*Path(member.name).parts[2:])
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src:
                target.write_bytes(src.read())


def ensure_assets() -> Path:
    """Make sure every pinned library is extracted under STATIC; returns STATIC."""
    for name, version, integrity, keep, folder in PACKAGES:
        dest = STATIC / folder
        stamp = dest / f".{name}-{version}"
        if stamp.exists():
            continue
        shutil.rmtree(dest, ignore_errors=True)
        _extract(_tarball(name, version, integrity), keep, dest)
        stamp.touch()
    return STATIC


def ready() -> bool:
    """True when every pinned library is already extracted (a build then needs no network)."""
    return all((STATIC / folder / f".{name}-{version}").exists() for name, version, _, _, folder in PACKAGES)


if __name__ == "__main__":  # `uv run python website/vendor.py`: fetch now (CI does, before the offline tests)
    print(f"site assets ready in {ensure_assets()}")
