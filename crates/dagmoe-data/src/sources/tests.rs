//! End-to-end tests of `DocumentSource` over real files in a temporary directory.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parquet::basic::Compression as ParquetCompression;
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use super::*;
use crate::tokenizer::{TextTokenizer, train_bpe_tokenizer};

fn write(path: &Path, bytes: impl AsRef<[u8]>) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

fn options() -> SourceOptions {
    SourceOptions::default()
}

fn segments(inputs: &[&Path], options: SourceOptions) -> (Vec<Segment>, SourceStats) {
    let mut source = DocumentSource::open(inputs, options).unwrap();
    let segments = (&mut source).collect::<Result<Vec<_>>>().unwrap();
    (segments, *source.stats())
}

fn keys(documents: &[(String, String)]) -> Vec<&str> {
    documents.iter().map(|(key, _)| key.as_str()).collect()
}

fn error_message(inputs: &[&Path], options: SourceOptions) -> String {
    let source = DocumentSource::open(inputs, options).unwrap();
    let results: Vec<Result<Segment>> = source.collect();
    let error = results.into_iter().find_map(|result| result.err()).expect("an error");
    error.to_string()
}

fn fail_on_bad_records() -> SourceOptions {
    SourceOptions { bad_records: BadRecordPolicy::Fail, ..options() }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(bytes, ruzstd::encoding::CompressionLevel::Fastest)
}

#[test]
fn directory_documents_in_sorted_order() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    write(&corpus.join("b.txt"), "bravo");
    write(&corpus.join("a/2.jsonl"), "{\"text\": \"alpha two\"}\n");
    write(&corpus.join("a/1.txt"), "alpha one");
    write(&corpus.join("c.txt"), "  \n");

    let (documents, stats) = read_all(&[&corpus], options()).unwrap();
    assert_eq!(keys(&documents), ["a/1.txt", "a/2.jsonl:1", "b.txt"]);
    assert_eq!(documents[1].1, "alpha two");
    assert_eq!(stats, SourceStats { files: 4, documents: 3, empty_documents: 1, bad_records: 0, bytes: 23 });
}

#[test]
fn glob_keys_are_relative_to_pattern_root() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("dump/en/part-1.jsonl"), "{\"text\": \"one\"}\n{\"text\": \"two\"}\n");
    write(&dir.path().join("dump/de/part-1.jsonl"), "{\"text\": \"eins\"}\n");
    write(&dir.path().join("dump/en/notes.txt"), "not matched");

    let (documents, _) = read_all(&[dir.path().join("dump/*/*.jsonl")], options()).unwrap();
    assert_eq!(keys(&documents), ["de/part-1.jsonl:1", "en/part-1.jsonl:1", "en/part-1.jsonl:2"]);
}

#[test]
fn single_file_key_is_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir.path().join("nested/book.txt"), "text");
    let (documents, _) = read_all(&[path], options()).unwrap();
    assert_eq!(keys(&documents), ["book.txt"]);
}

#[test]
fn separator_splits_and_skips_empty_parts() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir.path().join("docs.txt"), "first\n<|doc|>\n \n<|doc|>second\n<|doc|><|doc|>third\n<|doc|>");
    let separated = SourceOptions { separator: Some("<|doc|>".into()), ..options() };

    let (documents, stats) = read_all(&[&path], separated).unwrap();
    assert_eq!(keys(&documents), ["docs.txt#0", "docs.txt#2", "docs.txt#4"]);
    assert_eq!(documents[0].1, "first\n");
    assert_eq!(documents[1].1, "second\n");
    assert_eq!(documents[2].1, "third\n");
    // Part 1 is whitespace and part 3 is empty. Nothing follows the last separator, which is no document.
    assert_eq!(stats.empty_documents, 2);
    assert_eq!(stats.documents, 3);
}

#[test]
fn separator_of_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir.path().join("a.txt"), "one\ntwo\n\n\nthree\n\n\n\n\n\nfour");
    let separated = SourceOptions { separator: Some("\n\n\n".into()), ..options() };

    let (documents, stats) = read_all(&[&path], separated).unwrap();
    let texts: Vec<&str> = documents.iter().map(|(_, text)| text.as_str()).collect();
    assert_eq!(texts, ["one\ntwo", "three", "four"]);
    assert_eq!(stats.empty_documents, 1);
}

#[test]
fn jsonl_plain_gzip_and_zstd_with_custom_field() {
    let dir = tempfile::tempdir().unwrap();
    let lines =
        "{\"id\": 1, \"content\": \"first \\u00e9\"}\n\n{\"content\": \"second\", \"text\": 5}\r\n{\"content\": \"\"}";
    write(&dir.path().join("a.jsonl"), lines);
    write(&dir.path().join("b.jsonl.gz"), gzip(lines.as_bytes()));
    write(&dir.path().join("c.jsonl.zst"), zstd(lines.as_bytes()));
    let custom_field = SourceOptions { text_field: "content".into(), ..options() };

    let (documents, stats) = read_all(&[dir.path()], custom_field).unwrap();
    let expected: Vec<(String, String)> = ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst"]
        .iter()
        .flat_map(|file| [(format!("{file}:1"), "first é".to_string()), (format!("{file}:3"), "second".to_string())])
        .collect();
    assert_eq!(documents, expected);
    // Each file has a blank line and an empty text.
    assert_eq!(stats.empty_documents, 6);
    assert_eq!(stats.bad_records, 0);
}

#[test]
fn jsonl_bad_lines_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines =
        b"{\"text\": \"good one\"}\n{\"text\": \"unterminated}\n{\"body\": \"x\"}\n{\"text\": null}\n".to_vec();
    lines.extend_from_slice(b"{\"text\": \"bad \xff byte\"}\n[\"text\"]\n{\"text\": \"good two\"}\n");
    let path = write(&dir.path().join("bad.jsonl"), lines);

    let (documents, stats) = read_all(&[&path], options()).unwrap();
    assert_eq!(keys(&documents), ["bad.jsonl:1", "bad.jsonl:7"]);
    assert_eq!(stats.bad_records, 5);
    assert_eq!(stats.documents, 2);
}

#[test]
fn jsonl_bad_line_fails_naming_file_and_line() {
    let cases: [(&[u8], &str); 6] = [
        (b"{\"text\": \"unterminated}", "invalid JSON at column"),
        (b"{\"body\": \"x\"}", "missing field \"text\""),
        (b"{\"text\": 12}", "field \"text\" is a number, expected a string"),
        (b"{\"text\": null}", "field \"text\" is null"),
        (b"{\"text\": \"\xc3\x28\"}", "invalid UTF-8 at byte 11 of the line"),
        (b"[\"text\"]", "expected a JSON object"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (index, (bad_line, reason)) in cases.into_iter().enumerate() {
        let mut lines = b"{\"text\": \"fine\"}\n\n".to_vec();
        lines.extend_from_slice(bad_line);
        lines.extend_from_slice(b"\n{\"text\": \"after\"}\n");
        let path = write(&dir.path().join(format!("case-{index}.jsonl")), lines);

        let message = error_message(&[&path], fail_on_bad_records());
        assert!(message.contains(&format!("case-{index}.jsonl:3: ")), "{message}");
        assert!(message.contains(reason), "{message}");
        assert!(message.contains("fix or remove this record"), "{message}");
    }
}

#[test]
fn invalid_utf8_text_file_is_a_bad_record() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(&dir.path().join("bad.txt"), b"caf\xe9 latin-1");
    let good = write(&dir.path().join("good.txt"), "fine");

    let (documents, stats) = read_all(&[&bad, &good], options()).unwrap();
    assert_eq!(keys(&documents), ["good.txt"]);
    assert_eq!(stats.bad_records, 1);

    let message = error_message(&[&bad, &good], fail_on_bad_records());
    assert!(message.contains("bad.txt, byte 3: invalid UTF-8"), "{message}");
}

#[test]
fn invalid_utf8_after_first_segment_discards_document() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = "line of text\n".repeat(40).into_bytes();
    let invalid_at = bytes.len() + 5;
    bytes.extend_from_slice(b"more \xff\n");
    bytes.extend_from_slice("tail line\n".repeat(40).as_bytes());
    let path = write(&dir.path().join("long.txt"), &bytes);
    let short_segments = SourceOptions { segment_bytes: 64, ..options() };

    let (all, stats) = segments(&[&path], short_segments.clone());
    let last = all.last().unwrap();
    assert_eq!(last, &Segment { key: "long.txt".into(), text: String::new(), end_of_document: true, discarded: true });
    let yielded: String = all.iter().map(|segment| segment.text.as_str()).collect();
    assert!(String::from_utf8_lossy(&bytes).starts_with(&yielded));
    assert!(yielded.len() < invalid_at);
    assert_eq!(all.iter().filter(|segment| segment.end_of_document).count(), 1);
    assert_eq!(stats.documents, 0, "the dropped document is not counted as read");
    assert_eq!(stats.bytes, 0);
    assert_eq!(stats.bad_records, 1);

    let strict = SourceOptions { bad_records: BadRecordPolicy::Fail, ..short_segments };
    let message = error_message(&[&path], strict);
    assert!(message.contains(&format!("long.txt, byte {invalid_at}: invalid UTF-8")), "{message}");
}

#[test]
fn compressed_text_is_decompressed() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a.txt.gz"), gzip(b"gzip text"));
    write(&dir.path().join("b.txt.zst"), zstd(b"zstd text"));

    let (documents, _) = read_all(&[dir.path()], options()).unwrap();
    assert_eq!(documents, [("a.txt.gz".into(), "gzip text".into()), ("b.txt.zst".into(), "zstd text".into())]);
}

fn write_parquet(path: &Path, row_groups: &[&[Option<&[u8]>]]) {
    write_parquet_compressed(path, row_groups, ParquetCompression::SNAPPY);
}

fn write_parquet_compressed(path: &Path, row_groups: &[&[Option<&[u8]>]], compression: ParquetCompression) {
    let schema =
        parse_message_type("message documents { REQUIRED INT64 id; OPTIONAL BYTE_ARRAY body (UTF8); }").unwrap();
    let properties = WriterProperties::builder().set_compression(compression).build();
    let file = File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(properties)).unwrap();
    let mut next_id = 0i64;
    for rows in row_groups {
        let mut group = writer.next_row_group().unwrap();

        let ids: Vec<i64> = (next_id..next_id + rows.len() as i64).collect();
        next_id += rows.len() as i64;
        let mut column = group.next_column().unwrap().unwrap();
        column.typed::<Int64Type>().write_batch(&ids, None, None).unwrap();
        column.close().unwrap();

        let values: Vec<ByteArray> = rows.iter().flatten().map(|bytes| ByteArray::from(bytes.to_vec())).collect();
        let definition_levels: Vec<i16> = rows.iter().map(|row| i16::from(row.is_some())).collect();
        let mut column = group.next_column().unwrap().unwrap();
        column.typed::<ByteArrayType>().write_batch(&values, Some(&definition_levels), None).unwrap();
        column.close().unwrap();

        group.close().unwrap();
    }
    writer.close().unwrap();
}

#[test]
fn parquet_text_column_with_nulls() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table.parquet");
    write_parquet(
        &path,
        &[&[Some(b"row zero"), None, Some(b"")], &[Some(b"row three"), Some(b"bad \xff"), Some(b"row five")]],
    );
    let body = SourceOptions { text_field: "body".into(), ..options() };

    let (documents, stats) = read_all(&[&path], body.clone()).unwrap();
    let expected = [("table.parquet:0", "row zero"), ("table.parquet:3", "row three"), ("table.parquet:5", "row five")];
    let expected: Vec<(String, String)> =
        expected.iter().map(|(key, text)| (key.to_string(), text.to_string())).collect();
    assert_eq!(documents, expected);
    assert_eq!(stats.bad_records, 2);
    assert_eq!(stats.empty_documents, 1);

    let message = error_message(&[&path], SourceOptions { bad_records: BadRecordPolicy::Fail, ..body });
    assert!(message.contains("table.parquet, row 1: column \"body\" is null"), "{message}");
}

#[test]
#[cfg(feature = "parquet-zstd")]
fn parquet_zstd_pages_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zstd.parquet");
    let compression = ParquetCompression::ZSTD(parquet::basic::ZstdLevel::default());
    write_parquet_compressed(&path, &[&[Some(b"zstd row")]], compression);
    let body = SourceOptions { text_field: "body".into(), ..options() };

    let (documents, _) = read_all(&[&path], body).unwrap();
    assert_eq!(documents, [("zstd.parquet:0".to_string(), "zstd row".to_string())]);
}

#[test]
fn parquet_column_must_be_strings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("table.parquet");
    write_parquet(&path, &[&[Some(b"text")]]);

    let missing = DocumentSource::open(&[&path], options()).unwrap().next().unwrap().unwrap_err().to_string();
    assert!(missing.contains("no column \"text\"; the columns are id, body"), "{missing}");

    let numbers = SourceOptions { text_field: "id".into(), ..options() };
    let wrong_type = DocumentSource::open(&[&path], numbers).unwrap().next().unwrap().unwrap_err().to_string();
    assert!(wrong_type.contains("column \"id\" has type INT64, expected a string column"), "{wrong_type}");
}

#[test]
fn options_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir.path().join("a.txt"), "x");
    let invalid = [
        SourceOptions { segment_bytes: 0, ..options() },
        SourceOptions { text_field: String::new(), ..options() },
        SourceOptions { separator: Some(String::new()), ..options() },
    ];
    for options in invalid {
        assert!(DocumentSource::open(&[&path], options.clone()).is_err(), "{options:?}");
    }
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fixtures/kernel-docs-sample/sources")
}

fn fixture_texts() -> Vec<String> {
    let (documents, _) = read_all(&[fixture_dir()], options()).unwrap();
    documents.into_iter().map(|(_, text)| text).collect()
}

fn fixture_tokenizer(dir: &Path, texts: &[String]) -> TextTokenizer {
    train_bpe_tokenizer(texts, 600, &[], &dir.join("tokenizer.json")).unwrap()
}

/// Asserts that the segments concatenate to `text` and that their ids concatenate to the ids of `text`.
fn assert_segments_match(tokenizer: &TextTokenizer, segments: &[Segment], text: &str) {
    let joined: String = segments.iter().map(|segment| segment.text.as_str()).collect();
    assert_eq!(joined, text);
    let whole = tokenizer.encode(text).unwrap();
    let mut pieces = Vec::new();
    for segment in segments {
        pieces.extend(tokenizer.encode(&segment.text).unwrap());
    }
    assert_eq!(pieces, whole, "segment ids differ from whole-document ids");
}

#[test]
fn segments_tokenize_like_whole_documents() {
    let dir = tempfile::tempdir().unwrap();
    let texts = fixture_texts();
    let tokenizer = fixture_tokenizer(dir.path(), &texts);
    let short_segments = SourceOptions { segment_bytes: 300, ..options() };

    // Every fixture file as a plain text document, streamed from disk.
    let (all, stats) = segments(&[&fixture_dir()], short_segments.clone());
    assert_eq!(stats.documents as usize, texts.len());
    let mut documents = all.split_inclusive(|segment| segment.end_of_document);
    for text in &texts {
        let document = documents.next().unwrap();
        assert_segments_match(&tokenizer, document, text);
    }
    assert!(all.len() > 2 * texts.len(), "only {} segments for {} documents", all.len(), texts.len());

    // The whole fixture as one 218 KB document, in a gzip file and as a JSONL record.
    let book = texts.concat();
    let gzip_path = write(&dir.path().join("book.txt.gz"), gzip(book.as_bytes()));
    let (book_segments, _) = segments(&[&gzip_path], short_segments.clone());
    assert!(book_segments.len() > book.len() / 600, "{} segments", book_segments.len());
    assert_segments_match(&tokenizer, &book_segments, &book);

    let record = serde_json::json!({ "text": book }).to_string();
    let jsonl_path = write(&dir.path().join("book.jsonl"), record);
    let (record_segments, _) = segments(&[&jsonl_path], short_segments);
    assert!(record_segments.iter().all(|segment| segment.key == "book.jsonl:1"));
    assert_eq!(
        record_segments,
        book_segments.iter().map(|s| Segment { key: "book.jsonl:1".into(), ..s.clone() }).collect::<Vec<_>>()
    );
    assert_segments_match(&tokenizer, &record_segments, &book);
}

#[test]
fn arbitrary_cuts_change_token_ids() {
    // Shows that the identity checked above is not automatic: cutting inside
    // words or whitespace runs changes the ids.
    let dir = tempfile::tempdir().unwrap();
    let texts = fixture_texts();
    let tokenizer = fixture_tokenizer(dir.path(), &texts);
    let text = &texts[0];
    let whole = tokenizer.encode(text).unwrap();

    let mut changed = 0;
    for cut in (1..text.len()).step_by(97).filter(|&cut| text.is_char_boundary(cut)) {
        let mut ids = tokenizer.encode(&text[..cut]).unwrap();
        ids.extend(tokenizer.encode(&text[cut..]).unwrap());
        changed += usize::from(ids != whole);
    }
    assert!(changed > 10, "only {changed} arbitrary cuts changed the ids");
}

#[test]
fn separated_long_documents_are_segmented() {
    let dir = tempfile::tempdir().unwrap();
    let texts = fixture_texts();
    let tokenizer = fixture_tokenizer(dir.path(), &texts);
    let path = write(&dir.path().join("all.txt"), texts.join("<|doc|>"));
    let options = SourceOptions { separator: Some("<|doc|>".into()), segment_bytes: 500, ..options() };

    let (all, stats) = segments(&[&path], options);
    assert_eq!(stats.documents as usize, texts.len());
    let mut documents = all.split_inclusive(|segment| segment.end_of_document);
    for (index, text) in texts.iter().enumerate() {
        let document = documents.next().unwrap();
        assert!(document.iter().all(|segment| segment.key == format!("all.txt#{index}")));
        assert_segments_match(&tokenizer, document, text);
    }
}

#[test]
fn document_without_safe_cut_is_one_segment() {
    let dir = tempfile::tempdir().unwrap();
    let single_line = "word ".repeat(100);
    let crlf_lines = "word word\r\n".repeat(50);
    write(&dir.path().join("a.txt"), &single_line);
    write(&dir.path().join("b.txt"), &crlf_lines);
    let short_segments = SourceOptions { segment_bytes: 32, ..options() };

    let (all, _) = segments(&[dir.path()], short_segments);
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].text, single_line);
    assert_eq!(all[1].text, crlf_lines);
}

/// A generated stream of lines that counts the bytes read from it.
struct CountingLines {
    remaining: usize,
    read: Arc<AtomicUsize>,
}

impl Read for CountingLines {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let line = b"streamed line\n";
        let count = buffer.len().min(self.remaining) / line.len() * line.len();
        for chunk in buffer[..count].chunks_mut(line.len()) {
            chunk.copy_from_slice(line);
        }
        self.remaining -= count;
        self.read.fetch_add(count, Ordering::Relaxed);
        Ok(count)
    }
}

#[test]
fn long_document_is_not_read_whole() {
    let read = Arc::new(AtomicUsize::new(0));
    let stream = CountingLines { remaining: 64 << 20, read: Arc::clone(&read) };
    let mut reader =
        plain_text::PlainTextReader::new("stream.txt".into(), "stream.txt".into(), Box::new(stream), false, None, 1000);

    for _ in 0..3 {
        let Some(Record::Text { text, end_of_document, .. }) = reader.next_record().unwrap() else {
            panic!("expected a text piece");
        };
        assert!(!end_of_document);
        assert!(text.len() <= 1000, "piece of {} bytes", text.len());
        assert!(text.len() > 900, "piece of {} bytes", text.len());
    }
    assert!(read.load(Ordering::Relaxed) <= 256 << 10, "read {} bytes for three pieces", read.load(Ordering::Relaxed));
}
