"""Write eval/data/forge_prose.jsonl: human-written English prose for the perplexity gates.

Source: the Python 3.11 documentation as Debian ships it (package python3.11-doc, pinned below by
version and the .deb's sha256 from the Debian archive index), its reStructuredText sources under
usr/share/doc/python3.11/html/_sources/: the tutorial, the FAQ and the HOWTOs. Written by people
(the CPython documentation authors), licensed under the PSF License Agreement, which permits
redistribution with the PSF's copyright notice retained (eval/data/forge_prose.LICENSE).

Why this text: the calibration sets are forge's templated generator (calibration/generated-en.yaml)
and chat/news sets from the Hub; the perplexity gate must be measured on text the quantizer never
saw and that no forge template wrote.

Kept: plain paragraphs only (no code, no directives, tables, lists or headings), inline markup
reduced to its text, 200-600 characters, starting a sentence; every STRIDE-th of them in file order, so all documents
contribute. Deterministic: the same .deb gives the same bytes (tests/unit/test_evaluation.py).

    apt-get download python3.11-doc=3.11.2-6+deb12u9     # (apt-get update first)
    python eval/extract_prose.py python3.11-doc_3.11.2-6+deb12u9_all.deb
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "python3.11-doc"
VERSION = "3.11.2-6+deb12u9"
DEB_SHA256 = "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be"
SOURCES = "usr/share/doc/python3.11/html/_sources"
FOLDERS = ("tutorial", "faq", "howto")
MIN_CHARS, MAX_CHARS = 200, 600
STRIDE = 8
LICENSE = "PSF-2.0 (Python Software Foundation License Agreement)"

_ROLE = re.compile(r":[a-zA-Z:]+:`([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`len` -> len; :ref:`text <target>` -> text
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")  # `text <url>`_ -> text
_LITERAL = re.compile(r"``([^`]+)``")
_EMPH = re.compile(r"(\*\*|\*)([^*]+)\1")
_REF = re.compile(r"`([^`]+)`_*")
_BLOCK_START = ("..", "::", ">>>", "* ", "- ", "#", "=", "+", "|", "$ ", "%", "$", "1. ", "2. ", "(")


def sources_from_deb(deb: Path) -> dict[str, str]:
    """{relative path: text} of the reST sources in FOLDERS, read from the .deb (ar + data.tar.xz)."""
    digest = hashlib.sha256(Path(deb).read_bytes()).hexdigest()
    if digest != DEB_SHA256:
        raise SystemExit(f"{deb}: sha256 {digest}, expected {DEB_SHA256} ({PACKAGE} {VERSION}). Fix: "
                         f"apt-get download {PACKAGE}={VERSION}")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["ar", "x", str(Path(deb).resolve()), "data.tar.xz"], cwd=tmp, check=True)
        data = (Path(tmp) / "data.tar.xz").read_bytes()
    out: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix("./")
            if member.isfile() and any(name.startswith(f"{SOURCES}/{f}/") for f in FOLDERS) and name.endswith(".rst.txt"):
                out[name.removeprefix(SOURCES + "/")] = tar.extractfile(member).read().decode("utf-8")
    return out


def plain(text: str) -> str:
    text = _ROLE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _EMPH.sub(r"\2", text)
    text = _REF.sub(r"\1", text)
    text = re.sub(r"\s*\[#[^\]]*\]_", "", text)  # footnote references
    text = text.replace("\\", "").replace(" --- ", " - ")
    return re.sub(r"\s+", " ", text).strip()


def paragraphs(rst: str) -> list[str]:
    """Plain prose paragraphs of one reST file."""
    out = []
    blocks = re.split(r"\n\s*\n", rst)
    for i, block in enumerate(blocks):
        lines = block.strip("\n").splitlines()
        if not lines or any(line[:1].isspace() for line in lines) or lines[0].lstrip().startswith(_BLOCK_START):
            continue
        if any(set(line.strip()) <= set("=-~^*#+`'\"") for line in lines):  # a heading's under/overline
            continue
        if i + 1 < len(blocks) and blocks[i + 1][:1].isspace():
            continue  # introduces an indented block (code, a quote, a directive body)
        text = plain(" ".join(lines))
        if text.endswith("::"):
            continue
        if MIN_CHARS <= len(text) <= MAX_CHARS and text[0].isupper() and text[-1] in ".!?)" and "`" not in text and "|" not in text:
            out.append(text)
    return out


def documents(sources: dict[str, str]) -> list[dict]:
    found = [(path, para) for path in sorted(sources) for para in paragraphs(sources[path])]
    kept = found[::STRIDE]
    return [{"id": i, "source": f"{PACKAGE} {VERSION}: {path}", "text": text} for i, (path, text) in enumerate(kept)]


def write(deb: Path, out: Path) -> Path:
    rows = documents(sources_from_deb(deb))
    out.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("deb", type=Path, help=f"{PACKAGE}_{VERSION}_all.deb")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data" / "forge_prose.jsonl")
    args = parser.parse_args(argv)
    path = write(args.deb, args.out)
    print(f"forge_prose: {path} ({sum(1 for _ in path.open())} paragraphs)")


if __name__ == "__main__":
    main()
