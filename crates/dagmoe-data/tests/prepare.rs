//! `prepare_corpus` on the committed kernel-docs sample: splits, BOS policy,
//! input formats that must give the same tokens, long-document streaming and
//! bad-record accounting, each checked against the shards read back.

use std::io::Write;
use std::path::{Path, PathBuf};

use dagmoe_data::manifest::Split;
use dagmoe_data::prepare::{PrepareProgress, split_of};
use dagmoe_data::sources::{BadRecordPolicy, SourceOptions};
use dagmoe_data::{Manifest, PrepareOptions, TextTokenizer, TokenStream, prepare_corpus, train_bpe_tokenizer};

fn sample_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fixtures/kernel-docs-sample/sources")
}

/// Returns the sample's documents in the order `prepare` reads a directory.
fn sample_documents() -> Vec<(String, String)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(sample_dir()).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
        .collect()
}

fn tokenizer(dir: &Path) -> TextTokenizer {
    let texts: Vec<String> = sample_documents().into_iter().map(|(_, text)| text).collect();
    train_bpe_tokenizer(&texts, 400, &[], &dir.join("tokenizer.json")).unwrap()
}

fn prepare(tokenizer: &TextTokenizer, options: &PrepareOptions) -> (Manifest, Vec<PrepareProgress>) {
    let mut reports = Vec::new();
    let summary = prepare_corpus(tokenizer, options, &mut |progress| reports.push(progress)).unwrap();
    (summary.manifest, reports)
}

fn read_split(dir: &Path, manifest: &Manifest, split: Split) -> Vec<u32> {
    let stream = TokenStream::open(dir, manifest, split).unwrap();
    let mut tokens = vec![0; stream.len() as usize];
    stream.read(0, &mut tokens);
    tokens
}

fn options(input: PathBuf, output: PathBuf) -> PrepareOptions {
    PrepareOptions { shard_tokens: 4096, batch_documents: 4, ..PrepareOptions::new(vec![input], output) }
}

#[test]
fn splits_follow_key_hash_and_cover_every_document() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer(dir.path());
    let output = dir.path().join("kernel");
    let split = PrepareOptions { valid_fraction: 0.2, test_fraction: 0.2, ..options(sample_dir(), output.clone()) };
    let (manifest, _) = prepare(&tokenizer, &split);

    let documents = sample_documents();
    let count = |split| documents.iter().filter(|(key, _)| split_of(key, 0.2, 0.2) == split).count() as u64;
    assert_eq!(manifest.train.documents, count(Split::Train));
    assert_eq!(manifest.valid.documents, count(Split::Valid));
    assert_eq!(manifest.test.documents, count(Split::Test));
    assert!(manifest.test.documents > 0, "the sample is large enough for a test split");
    assert_eq!(manifest.name, "kernel");

    // Each split is its documents' tokens in input order, each followed by EOS.
    let eos = tokenizer.eos_id();
    let mut expected = Vec::new();
    for (key, text) in &documents {
        if split_of(key, 0.2, 0.2) == Split::Test {
            expected.extend(tokenizer.encode(text).unwrap());
            expected.push(eos);
        }
    }
    assert_eq!(read_split(&output, &manifest, Split::Test), expected);
}

#[test]
fn bos_token_starts_every_document() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer(dir.path());
    let output = dir.path().join("with-bos");
    let with_bos = PrepareOptions {
        valid_fraction: 0.0,
        bos_token: Some(dagmoe_data::EOS_TOKEN.to_string()),
        ..options(sample_dir(), output.clone())
    };
    let (manifest, _) = prepare(&tokenizer, &with_bos);
    let eos = tokenizer.eos_id();
    assert_eq!(manifest.bos_id, Some(eos));
    let tokens = read_split(&output, &manifest, Split::Train);
    let mut expected = Vec::new();
    for (_, text) in sample_documents() {
        expected.push(eos);
        expected.extend(tokenizer.encode(&text).unwrap());
        expected.push(eos);
    }
    assert_eq!(tokens, expected);

    for token in ["<s>", "a"] {
        let output = dir.path().join("rejected-bos");
        let rejected = PrepareOptions { bos_token: Some(token.into()), ..options(sample_dir(), output.clone()) };
        let error = prepare_corpus(&tokenizer, &rejected, &mut |_| {}).unwrap_err().to_string();
        assert!(error.contains(&format!("{token:?} is not a special token")), "{error}");
        assert!(!output.exists());
    }
}

#[test]
fn jsonl_gz_gives_the_same_tokens_as_text_files() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer(dir.path());
    let jsonl = dir.path().join("sample.jsonl.gz");
    let mut encoder = flate2::write::GzEncoder::new(std::fs::File::create(&jsonl).unwrap(), flate2::Compression::fast());
    for (key, text) in sample_documents() {
        writeln!(encoder, "{}", serde_json::json!({ "id": key, "body": text })).unwrap();
    }
    encoder.finish().unwrap();

    let (from_text, _) = prepare(&tokenizer, &PrepareOptions { valid_fraction: 0.0, ..options(sample_dir(), dir.path().join("text")) });
    let source = SourceOptions { text_field: "body".into(), ..SourceOptions::default() };
    let jsonl_options = PrepareOptions { valid_fraction: 0.0, source, ..options(jsonl, dir.path().join("jsonl")) };
    let (from_jsonl, _) = prepare(&tokenizer, &jsonl_options);
    assert_eq!(from_jsonl.train.documents, from_text.train.documents);
    assert_eq!(
        read_split(&dir.path().join("jsonl"), &from_jsonl, Split::Train),
        read_split(&dir.path().join("text"), &from_text, Split::Train)
    );
}

#[test]
fn long_document_is_streamed_in_segments_with_identical_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer(dir.path());
    let whole: String = sample_documents().into_iter().map(|(_, text)| text).collect();
    let corpus = dir.path().join("one-document");
    std::fs::create_dir(&corpus).unwrap();
    std::fs::write(corpus.join("all.txt"), &whole).unwrap();

    let streamed = PrepareOptions {
        valid_fraction: 0.0,
        source: SourceOptions { segment_bytes: 2048, ..SourceOptions::default() },
        ..options(corpus.clone(), dir.path().join("streamed"))
    };
    let (manifest, reports) = prepare(&tokenizer, &streamed);
    assert_eq!(manifest.train.documents, 1);
    assert!(reports.len() > 10, "a {}-byte document in 2 KiB segments reports progress often", whole.len());

    let mut expected = tokenizer.encode(&whole).unwrap();
    expected.push(tokenizer.eos_id());
    assert_eq!(read_split(&dir.path().join("streamed"), &manifest, Split::Train), expected);
    let last = reports.last().unwrap();
    assert_eq!((last.documents, last.bytes, last.tokens), (1, whole.len() as u64, expected.len() as u64));
}

#[test]
fn bad_records_are_counted_or_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer(dir.path());
    let jsonl = dir.path().join("mixed.jsonl");
    let documents = sample_documents();
    let mut lines = Vec::new();
    lines.push(serde_json::json!({ "text": documents[0].1 }).to_string());
    lines.push("{ not json".to_string());
    lines.push(serde_json::json!({ "title": "no text field" }).to_string());
    lines.push(serde_json::json!({ "text": "   " }).to_string());
    lines.push(serde_json::json!({ "text": documents[1].1 }).to_string());
    std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();

    let (manifest, _) = prepare(&tokenizer, &PrepareOptions { valid_fraction: 0.0, ..options(jsonl.clone(), dir.path().join("skip")) });
    assert_eq!(manifest.train.documents, 2);
    assert_eq!(manifest.bad_records, 2);
    assert_eq!(manifest.empty_documents, 1);
    assert_eq!(manifest.skipped_documents, 3);

    let source = SourceOptions { bad_records: BadRecordPolicy::Fail, ..SourceOptions::default() };
    let strict = PrepareOptions { source, ..options(jsonl, dir.path().join("fail")) };
    let error = prepare_corpus(&tokenizer, &strict, &mut |_| {}).unwrap_err().to_string();
    assert!(error.contains("mixed.jsonl:2: invalid JSON"), "{error}");
    assert!(!dir.path().join("fail").exists(), "a failed prepare leaves no output");
    assert!(!dir.path().join(".fail.partial").exists(), "a failed prepare removes its staging directory");
}

#[test]
fn fractions_that_leave_no_training_data_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer(dir.path());
    let halves = PrepareOptions { valid_fraction: 0.5, test_fraction: 0.5, ..options(sample_dir(), dir.path().join("none")) };
    let error = prepare_corpus(&tokenizer, &halves, &mut |_| {}).unwrap_err().to_string();
    assert!(error.contains("--valid-fraction 0.5"), "{error}");
    assert!(error.contains("--test-fraction 0.5"), "{error}");
}

#[test]
fn extra_special_tokens_are_trained_in() {
    let dir = tempfile::tempdir().unwrap();
    let texts: Vec<String> = sample_documents().into_iter().map(|(_, text)| text).collect();
    let specials = vec!["<|pad|>".to_string(), dagmoe_data::EOS_TOKEN.to_string()];
    let tokenizer = train_bpe_tokenizer(&texts, 400, &specials, &dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(tokenizer.vocab_size(), 400);
    assert!(tokenizer.token_id("<|pad|>").is_some(), "the extra special token is in the vocabulary");
    assert_eq!(tokenizer.token_id(dagmoe_data::EOS_TOKEN), Some(tokenizer.eos_id()));
}

#[test]
fn tokenizer_with_another_eos_name_prepares() {
    let dir = tempfile::tempdir().unwrap();
    tokenizer(dir.path());
    // The same vocabulary with a SentencePiece-style end-of-document token.
    let json = std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap();
    let foreign = dir.path().join("foreign.json");
    std::fs::write(&foreign, json.replace(dagmoe_data::EOS_TOKEN, "</s>")).unwrap();
    let tokenizer = TextTokenizer::load(&foreign).unwrap();
    assert_eq!(tokenizer.token_id("</s>"), Some(tokenizer.eos_id()));
    let (manifest, _) = prepare(&tokenizer, &options(sample_dir(), dir.path().join("foreign-prepared")));
    assert_eq!(manifest.eos_id, tokenizer.eos_id());

    std::fs::write(&foreign, json.replace(dagmoe_data::EOS_TOKEN, "<|unknown|>")).unwrap();
    let error = TextTokenizer::load(&foreign).err().expect("no end-of-document token").to_string();
    assert!(error.contains("</s>"), "{error}");
    assert!(error.contains("add `<|endoftext|>`"), "{error}");
}

#[test]
fn directory_walk_follows_links_and_skips_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer(dir.path());
    let documents = sample_documents();
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(outside.join("nested")).unwrap();
    std::fs::write(outside.join("nested/linked.txt"), &documents[0].1).unwrap();
    let corpus = dir.path().join("corpus");
    std::fs::create_dir_all(corpus.join(".git")).unwrap();
    std::fs::write(corpus.join("plain.txt"), &documents[1].1).unwrap();
    std::fs::write(corpus.join(".hidden.txt"), &documents[2].1).unwrap();
    std::fs::write(corpus.join(".git/config"), "[core]\n").unwrap();
    std::os::unix::fs::symlink(&outside, corpus.join("linked-dir")).unwrap();
    std::os::unix::fs::symlink(corpus.join("plain.txt"), corpus.join("linked.txt")).unwrap();
    // A link back to the corpus itself must not loop.
    std::os::unix::fs::symlink(&corpus, corpus.join("loop")).unwrap();

    let (manifest, _) = prepare(&tokenizer, &PrepareOptions { valid_fraction: 0.0, ..options(corpus.clone(), dir.path().join("out")) });
    // linked-dir/nested/linked.txt and plain.txt, read once although linked.txt
    // points to it too; no hidden file.
    assert_eq!(manifest.train.documents, 2);
    let expected_bytes = documents[1].1.len() + documents[0].1.len();
    assert_eq!(manifest.train.bytes, expected_bytes as u64);

    let inside = PrepareOptions { valid_fraction: 0.0, ..options(corpus.clone(), corpus.join("prepared")) };
    let error = prepare_corpus(&tokenizer, &inside, &mut |_| {}).unwrap_err().to_string();
    assert!(error.contains("is inside the input directory"), "{error}");
    assert!(!corpus.join("prepared").exists());
}

#[test]
fn document_unreadable_after_first_segment_is_dropped_whole() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer(dir.path());
    let documents = sample_documents();
    let corpus = dir.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    let mut long: Vec<u8> = documents.iter().flat_map(|(_, text)| text.bytes()).collect();
    long.extend_from_slice(b"\nbroken \xff byte\n");
    std::fs::write(corpus.join("a-long.txt"), &long).unwrap();
    std::fs::write(corpus.join("b-short.txt"), &documents[3].1).unwrap();

    let streamed = PrepareOptions {
        valid_fraction: 0.0,
        source: SourceOptions { segment_bytes: 2048, ..SourceOptions::default() },
        ..options(corpus, dir.path().join("out"))
    };
    let (manifest, _) = prepare(&tokenizer, &streamed);
    assert_eq!(manifest.train.documents, 1, "only the short document remains");
    assert_eq!(manifest.bad_records, 1);
    let mut expected = tokenizer.encode(&documents[3].1).unwrap();
    expected.push(tokenizer.eos_id());
    assert_eq!(read_split(&dir.path().join("out"), &manifest, Split::Train), expected);
    assert_eq!(manifest.train.bytes, documents[3].1.len() as u64);
}

#[test]
fn byte_order_mark_is_not_text() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer(dir.path());
    let text = &sample_documents()[0].1;
    let corpus = dir.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    std::fs::write(corpus.join("bom.txt"), format!("\u{feff}{text}")).unwrap();
    let (manifest, _) = prepare(&tokenizer, &PrepareOptions { valid_fraction: 0.0, ..options(corpus, dir.path().join("out")) });
    let mut expected = tokenizer.encode(text).unwrap();
    expected.push(tokenizer.eos_id());
    assert_eq!(read_split(&dir.path().join("out"), &manifest, Split::Train), expected);
}

#[test]
fn manifest_with_out_of_range_eos_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer(dir.path());
    let output = dir.path().join("out");
    prepare(&tokenizer, &options(sample_dir(), output.clone()));
    let path = output.join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    manifest["eos_id"] = serde_json::json!(9999);
    std::fs::write(&path, manifest.to_string()).unwrap();
    let error = Manifest::load(&output).unwrap_err().to_string();
    assert!(error.contains("special token id 9999 is outside the vocabulary of 400"), "{error}");
}

#[test]
fn empty_corpus_name_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer(dir.path());
    for name in ["", "two\nlines"] {
        let named = PrepareOptions { name: name.into(), ..options(sample_dir(), dir.path().join("out")) };
        let error = prepare_corpus(&tokenizer, &named, &mut |_| {}).unwrap_err().to_string();
        assert!(error.contains("empty or contains control characters"), "{error}");
    }
}
