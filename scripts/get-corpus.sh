#!/usr/bin/env bash
# Builds the real-text corpora from Debian documentation packages, without
# installing them: the reStructuredText sources of the Linux kernel
# documentation (training domain) and of the Python 3.11 documentation
# (out-of-domain evaluation). Each corpus keeps its package's copyright file.
#
# Output:
#   data/corpus/kernel-docs/sources/   .rst.txt sources from linux-doc-6.1
#   data/corpus/kernel-docs/COPYRIGHT  the package's copyright and license notice
#   data/corpus/python-docs/...        the same from python3.11-doc
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
corpus="$root/data/corpus"
work="$root/data/.packages"

# extract PACKAGE NAME SUBDIR: unpacks PACKAGE and copies the `_sources`
# tree found under SUBDIR to data/corpus/NAME/sources.
extract() {
    local package=$1 name=$2 subdir=$3
    local target="$corpus/$name"
    if [[ -f "$target/COMPLETE" ]]; then
        echo "corpus $name: already present in $target"
        return
    fi
    mkdir -p "$work"
    if ! ls "$work"/"${package}"_*.deb >/dev/null 2>&1; then
        # Stale package lists name versions the mirror no longer has:
        # refresh them once and retry.
        (cd "$work" && apt-get download "$package") || {
            apt-get update -qq
            (cd "$work" && apt-get download "$package")
        } || {
            echo "get-corpus: apt-get download $package failed; check the Debian mirror in /etc/apt/sources.list" >&2
            exit 1
        }
    fi
    local unpacked="$work/$package"
    rm -rf "$unpacked"
    dpkg -x "$work"/"${package}"_*.deb "$unpacked"
    local sources
    sources=$(find "$unpacked/$subdir" -type d -name _sources | head -n 1)
    if [[ -z "$sources" ]]; then
        echo "get-corpus: no _sources directory under $subdir in $package" >&2
        exit 1
    fi
    rm -rf "$target.partial"
    mkdir -p "$target.partial/sources"
    cp -r "$sources"/. "$target.partial/sources/"
    cp "$unpacked/usr/share/doc/$package/copyright" "$target.partial/COPYRIGHT"
    rm -rf "$target"
    mv "$target.partial" "$target"
    touch "$target/COMPLETE"
    rm -rf "$unpacked"
    echo "corpus $name: $(find "$target/sources" -type f | wc -l) documents, $(du -sh "$target" | cut -f1) in $target"
}

# Package lists are missing on a fresh machine; apt-get download needs them.
if ! apt-cache show linux-doc-6.1 >/dev/null 2>&1; then
    apt-get update -qq
fi

extract linux-doc-6.1 kernel-docs usr/share/doc/linux-doc-6.1
extract python3.11-doc python-docs usr/share/doc/python3.11
