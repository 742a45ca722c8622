//! Input resolution: paths, directories and glob patterns to a sorted list of
//! files, each with a key relative to its input and a format.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use crate::{DataError, Result};

use super::Format;

/// One file to read, with the key its documents are named by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    pub path: PathBuf,
    /// Path relative to the directory or glob root it was found under, with
    /// `/` separators; the file name for a file given directly.
    pub key: String,
}

/// Decompression applied before a text or JSONL file is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The concrete reader for one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FileFormat {
    Text(Compression),
    Jsonl(Compression),
    Parquet,
}

/// Lists the files of `inputs` in order: each input is a file, a directory
/// (read recursively, sorted by path) or a glob pattern (matches sorted by
/// path, matched directories read recursively).
///
/// A path that exists is never treated as a pattern. A file reached through
/// two inputs is an error, because its documents would be counted twice.
pub fn list_source_files<P: AsRef<Path>>(inputs: &[P]) -> Result<Vec<SourceFile>> {
    if inputs.is_empty() {
        return Err(DataError::Invalid("no corpus input given; pass a file, a directory or a glob pattern".into()));
    }
    let mut files = Vec::new();
    for input in inputs {
        files.extend(resolve_input(input.as_ref())?);
    }

    let mut seen = HashSet::new();
    for file in &files {
        let canonical = std::fs::canonicalize(&file.path).map_err(|e| DataError::io("resolve path", &file.path, e))?;
        if !seen.insert(canonical) {
            return Err(DataError::Invalid(format!(
                "file {} is matched by more than one input; remove the overlapping input",
                file.path.display()
            )));
        }
    }
    Ok(files)
}

fn resolve_input(input: &Path) -> Result<Vec<SourceFile>> {
    match std::fs::metadata(input) {
        Ok(metadata) if metadata.is_file() => {
            let key = input.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
            Ok(vec![SourceFile { path: input.to_path_buf(), key }])
        }
        Ok(_) => list_directory(input, input),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && is_glob_pattern(input) => expand_glob(input),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(DataError::Invalid(format!(
            "input {} does not exist; check the --input path",
            input.display()
        ))),
        Err(e) => Err(DataError::io("read corpus path", input, e)),
    }
}

/// Lists the documents under `input`: the file itself, or every file below the
/// directory, sorted by relative path so the result is the same on every machine.
///
/// Symbolic links are followed (a Hugging Face cache snapshot is made of
/// them), each directory and file once. Hidden entries, whose names start
/// with a dot such as `.git`, are skipped silently. Anything that is neither
/// a file nor a directory is skipped with a log line.
fn list_documents(input: &Path) -> Result<Vec<PathBuf>> {
    let metadata = std::fs::metadata(input).map_err(|e| DataError::io("read corpus path", input, e))?;
    if metadata.is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut visited = std::collections::HashSet::new();
    let mut pending = vec![input.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let canonical = std::fs::canonicalize(&dir).map_err(|e| DataError::io("resolve directory", &dir, e))?;
        if !visited.insert(canonical) {
            tracing::warn!(path = %dir.display(), "skipping a directory reached a second time through a symbolic link");
            continue;
        }
        let entries = std::fs::read_dir(&dir).map_err(|e| DataError::io("list directory", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| DataError::io("list directory", &dir, e))?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            // `metadata` follows symbolic links; a dangling link has none.
            match std::fs::metadata(&path) {
                Ok(target) if target.is_dir() => pending.push(path),
                Ok(target) if target.is_file() => files.push(path),
                Ok(_) => tracing::warn!(path = %path.display(), "skipping an entry that is neither a file nor a directory"),
                Err(error) => tracing::warn!(path = %path.display(), %error, "skipping an entry that cannot be read"),
            }
        }
    }
    files.sort();
    // A file reached through several links is read once, under its first path.
    let mut seen = std::collections::HashSet::new();
    files.retain(|path| {
        let first = seen.insert(std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()));
        if !first {
            tracing::warn!(path = %path.display(), "skipping a second path to a file already read");
        }
        first
    });
    if files.is_empty() {
        return Err(DataError::Invalid(format!(
            "corpus directory {} contains no files (hidden files are skipped); pass another --input",
            input.display()
        )));
    }
    Ok(files)
}

/// Lists every file below `directory` with keys relative to `root`.
fn list_directory(directory: &Path, root: &Path) -> Result<Vec<SourceFile>> {
    let paths = list_documents(directory)?;
    Ok(paths.into_iter().map(|path| SourceFile { key: relative_key(&path, root), path }).collect())
}

fn expand_glob(pattern: &Path) -> Result<Vec<SourceFile>> {
    let Some(pattern_text) = pattern.to_str() else {
        return Err(DataError::Invalid(format!(
            "glob pattern {} is not valid UTF-8; pass a directory instead",
            pattern.display()
        )));
    };
    // Like a shell, a wildcard does not match a leading dot, so `corpus/*`
    // skips `.git` and the hidden staging directories of `prepare`.
    let match_options = glob::MatchOptions { require_literal_leading_dot: true, ..glob::MatchOptions::new() };
    let matches = glob::glob_with(pattern_text, match_options)
        .map_err(|e| DataError::Invalid(format!("invalid glob pattern {pattern_text:?}: {e}")))?;
    let mut paths = Vec::new();
    for entry in matches {
        let path = entry.map_err(|e| {
            let unreadable = e.path().to_path_buf();
            DataError::io("read a directory matched by the glob pattern:", unreadable, e.into())
        })?;
        paths.push(path);
    }
    paths.sort();

    let root = glob_root(pattern);
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            files.extend(list_directory(&path, &root)?);
        } else {
            files.push(SourceFile { key: relative_key(&path, &root), path });
        }
    }
    if files.is_empty() {
        return Err(DataError::Invalid(format!(
            "no file matches the glob pattern {pattern_text:?}; check the pattern or pass a directory"
        )));
    }
    Ok(files)
}

fn is_glob_pattern(path: &Path) -> bool {
    path.to_str().is_some_and(|text| text.contains(['*', '?', '[']))
}

/// Returns the leading components of `pattern` without a wildcard, which
/// form the directory that the keys of its matches are relative to.
fn glob_root(pattern: &Path) -> PathBuf {
    pattern.components().take_while(|component| !is_glob_pattern(Path::new(component.as_os_str()))).collect()
}

/// `path` relative to `root`, joined with `/` on every platform so that keys,
/// and the train/valid split derived from them, do not depend on the OS.
fn relative_key(path: &Path, root: &Path) -> String {
    let relative = path.strip_prefix(root).unwrap_or(path);
    let parts: Vec<String> = relative
        .components()
        .filter(|component| matches!(component, Component::Normal(_)))
        .map(|component| component.as_os_str().to_string_lossy().into_owned())
        .collect();
    parts.join("/")
}

impl FileFormat {
    /// Chooses the reader for `path`. A `.gz`, `.zst` or `.zstd` suffix sets
    /// the compression. With [`Format::Auto`], the name before that suffix
    /// sets the format: `.jsonl` and `.parquet` are those, and any other name is text.
    pub(super) fn detect(path: &Path, format: Format) -> Self {
        let name = path.file_name().map(|name| name.to_string_lossy().to_lowercase()).unwrap_or_default();
        let (stem, compression) = if let Some(stem) = name.strip_suffix(".gz") {
            (stem, Compression::Gzip)
        } else if let Some(stem) = name.strip_suffix(".zst").or_else(|| name.strip_suffix(".zstd")) {
            (stem, Compression::Zstd)
        } else {
            (name.as_str(), Compression::None)
        };
        match format {
            Format::Text => Self::Text(compression),
            Format::Jsonl => Self::Jsonl(compression),
            Format::Parquet => Self::Parquet,
            Format::Auto if stem.ends_with(".jsonl") => Self::Jsonl(compression),
            Format::Auto if stem.ends_with(".parquet") && compression == Compression::None => Self::Parquet,
            Format::Auto => Self::Text(compression),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, relative: &str, text: &str) {
        let path = root.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn keys(files: &[SourceFile]) -> Vec<&str> {
        files.iter().map(|file| file.key.as_str()).collect()
    }

    #[test]
    fn directory_files_are_sorted_and_relative() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus");
        for relative in ["b.txt", "a/z.txt", "a/c.jsonl", "0.txt"] {
            write(&corpus, relative, "x");
        }
        let files = list_source_files(&[&corpus]).unwrap();
        assert_eq!(keys(&files), ["0.txt", "a/c.jsonl", "a/z.txt", "b.txt"]);
        assert_eq!(files[1].path, corpus.join("a/c.jsonl"));
    }

    #[test]
    fn single_file_key_is_file_name() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "deep/inside/doc.txt", "x");
        let files = list_source_files(&[dir.path().join("deep/inside/doc.txt")]).unwrap();
        assert_eq!(keys(&files), ["doc.txt"]);
    }

    #[test]
    fn glob_matches_sorted_relative_to_root() {
        let dir = tempfile::tempdir().unwrap();
        for relative in ["data/2/b.jsonl", "data/1/a.jsonl", "data/1/skip.txt", "data/3/c.jsonl"] {
            write(dir.path(), relative, "{}");
        }
        let pattern = dir.path().join("data/*/*.jsonl");
        let files = list_source_files(&[&pattern]).unwrap();
        assert_eq!(keys(&files), ["1/a.jsonl", "2/b.jsonl", "3/c.jsonl"]);

        // The same corpus elsewhere gives the same keys.
        let moved = tempfile::tempdir().unwrap();
        std::fs::rename(dir.path().join("data"), moved.path().join("data")).unwrap();
        let moved_files = list_source_files(&[moved.path().join("data/*/*.jsonl")]).unwrap();
        assert_eq!(keys(&moved_files), keys(&files));
    }

    #[test]
    fn glob_expands_matched_directories() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "shards/x1/part.txt", "x");
        write(dir.path(), "shards/x2/deeper/part.txt", "x");
        write(dir.path(), "shards/y/part.txt", "x");
        let files = list_source_files(&[dir.path().join("shards/x*")]).unwrap();
        assert_eq!(keys(&files), ["x1/part.txt", "x2/deeper/part.txt"]);
    }

    #[test]
    fn inputs_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "z.txt", "x");
        write(dir.path(), "docs/a.txt", "x");
        let files = list_source_files(&[dir.path().join("z.txt"), dir.path().join("docs")]).unwrap();
        assert_eq!(keys(&files), ["z.txt", "a.txt"]);
    }

    #[test]
    fn input_errors_name_the_input() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.txt", "x");

        let no_match = list_source_files(&[dir.path().join("*.jsonl")]).unwrap_err().to_string();
        assert!(no_match.contains("no file matches"), "{no_match}");
        assert!(no_match.contains("*.jsonl"), "{no_match}");

        let missing = list_source_files(&[dir.path().join("missing.txt")]).unwrap_err().to_string();
        assert!(missing.contains("missing.txt"), "{missing}");

        let overlap = list_source_files(&[dir.path().join("a.txt"), dir.path().join("*.txt")]).unwrap_err().to_string();
        assert!(overlap.contains("more than one input"), "{overlap}");
    }

    #[test]
    fn format_follows_extension_and_override() {
        let cases = [
            ("a.jsonl", Format::Auto, FileFormat::Jsonl(Compression::None)),
            ("a.JSONL.gz", Format::Auto, FileFormat::Jsonl(Compression::Gzip)),
            ("a.jsonl.zst", Format::Auto, FileFormat::Jsonl(Compression::Zstd)),
            ("a.parquet", Format::Auto, FileFormat::Parquet),
            ("a.json.gz", Format::Auto, FileFormat::Text(Compression::Gzip)),
            ("a.txt", Format::Auto, FileFormat::Text(Compression::None)),
            ("README", Format::Auto, FileFormat::Text(Compression::None)),
            ("a.json.gz", Format::Jsonl, FileFormat::Jsonl(Compression::Gzip)),
            ("a.jsonl", Format::Text, FileFormat::Text(Compression::None)),
            ("table.bin", Format::Parquet, FileFormat::Parquet),
        ];
        for (name, format, expected) in cases {
            assert_eq!(FileFormat::detect(Path::new(name), format), expected, "{name} with {format:?}");
        }
    }
}
