"""Encodes a directory of text documents with the Python `tokenizers` package.

The reference side of scripts/bench-data.sh. It reads the same files that
`dagmoe data prepare` reads: every file below the directory, links
followed, hidden entries and empty or non-UTF-8 files skipped. It encodes
them in batches of the same size with the same tokenizer.json and prints
one JSON line with the bytes, documents, tokens and seconds. Writing
shards is not included, so the comparison favours this side.
"""

import argparse
import json
import os
import time

from tokenizers import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", required=True, help="directory of text documents")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json")
    parser.add_argument("--batch-documents", type=int, default=256)
    args = parser.parse_args()

    started = time.perf_counter()
    tokenizer = Tokenizer.from_file(args.tokenizer)
    # dagmoe encodes a literal "<|endoftext|>" in a document as text, not as EOS.
    tokenizer.encode_special_tokens = True
    paths = []
    for root, dirs, names in os.walk(args.input, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths.extend(os.path.join(root, name) for name in names if not name.startswith("."))
    paths.sort()
    documents = tokens = text_bytes = 0
    batch: list[str] = []

    def encode(texts: list[str]) -> int:
        return sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))

    for path in paths:
        raw = open(path, "rb").read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue
        batch.append(text)
        documents += 1
        text_bytes += len(raw)
        if len(batch) == args.batch_documents:
            tokens += encode(batch)
            batch = []
    if batch:
        tokens += encode(batch)
    seconds = time.perf_counter() - started
    print(json.dumps({"documents": documents, "bytes": text_bytes, "tokens": tokens, "seconds": seconds}))


if __name__ == "__main__":
    main()
