//! Safe cut points for segmenting a long document.
//!
//! A cut is safe when tokenizing the two sides separately and concatenating
//! the ids gives the ids of the whole text. For a byte-level BPE with the
//! GPT-2 pre-tokenizer (the one `train_bpe_tokenizer` builds), a cut right
//! after a `\n` whose neighbors are both non-whitespace is safe. That `\n` is
//! then a pre-token of its own, because the patterns for letters, digits and
//! punctuation exclude whitespace and `\s+` stops at the non-whitespace
//! character after it. BPE merges never cross pre-tokens, so the ids on both
//! sides are unchanged. The tests in `sources` check this with a trained tokenizer.
//!
//! NOTE: text whose lines end in `\r\n`, or whose paragraphs are single long
//! lines separated by blank lines, has no such cut, so its documents are
//! never segmented and are read whole.

use memchr::{memchr_iter, memrchr_iter};

/// Returns the largest safe cut `c <= limit`, as a byte position in `bytes`.
pub(super) fn last_safe_cut(bytes: &[u8], limit: usize) -> Option<usize> {
    let limit = limit.min(bytes.len());
    memrchr_iter(b'\n', &bytes[..limit]).find(|&newline| is_safe_newline(bytes, newline)).map(|newline| newline + 1)
}

/// Returns the smallest safe cut after a newline at an index in `from..to`.
/// A candidate whose next character is not complete inside `bytes` is not safe.
pub(super) fn first_safe_cut(bytes: &[u8], from: usize, to: usize) -> Option<usize> {
    let to = to.min(bytes.len());
    if from >= to {
        return None;
    }
    memchr_iter(b'\n', &bytes[from..to])
        .map(|offset| from + offset)
        .find(|&newline| is_safe_newline(bytes, newline))
        .map(|newline| newline + 1)
}

/// Splits `text` into segments of at most `segment_bytes` bytes where a safe
/// cut allows it. A segment grows past `segment_bytes` up to the first safe
/// cut after it, and the last segment contains the rest.
pub(super) fn split_at_safe_cuts(text: &str, segment_bytes: usize) -> Vec<&str> {
    let mut segments = Vec::new();
    let mut rest = text;
    while rest.len() > segment_bytes {
        let bytes = rest.as_bytes();
        let Some(cut) =
            last_safe_cut(bytes, segment_bytes).or_else(|| first_safe_cut(bytes, segment_bytes, bytes.len()))
        else {
            break;
        };
        // A cut follows an ASCII newline, so it lies on a character boundary.
        let (head, tail) = rest.split_at(cut);
        segments.push(head);
        rest = tail;
    }
    segments.push(rest);
    segments
}

fn is_safe_newline(bytes: &[u8], newline: usize) -> bool {
    let before = char_ending_at(bytes, newline);
    let after = char_starting_at(bytes, newline + 1);
    matches!((before, after), (Some(before), Some(after)) if !before.is_whitespace() && !after.is_whitespace())
}

/// Decodes the character whose encoding ends right before `end`, if it is valid UTF-8.
fn char_ending_at(bytes: &[u8], end: usize) -> Option<char> {
    let window = &bytes[end.saturating_sub(4)..end];
    let last = window.utf8_chunks().last()?;
    if !last.invalid().is_empty() {
        return None;
    }
    last.valid().chars().next_back()
}

/// Decodes the character whose encoding starts at `start`, if it is valid and complete.
fn char_starting_at(bytes: &[u8], start: usize) -> Option<char> {
    let window = bytes.get(start..bytes.len().min(start + 4))?;
    window.utf8_chunks().next()?.valid().chars().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newline_between_words_is_safe() {
        assert_eq!(first_safe_cut(b"ab\ncd", 0, 5), Some(3));
        assert_eq!(last_safe_cut(b"ab\ncd\nef", 8), Some(6));
        assert_eq!(last_safe_cut(b"ab\ncd\nef", 5), Some(3));
    }

    #[test]
    fn newline_next_to_whitespace_is_unsafe() {
        for text in ["ab\n\ncd", "ab \ncd", "ab\n cd", "ab\r\ncd", "ab\n\tcd", "ab\u{a0}\ncd", "ab\n\u{3000}cd"] {
            let bytes = text.as_bytes();
            assert_eq!(first_safe_cut(bytes, 0, bytes.len()), None, "{text:?}");
            assert_eq!(last_safe_cut(bytes, bytes.len()), None, "{text:?}");
        }
    }

    #[test]
    fn newline_at_edges_is_unsafe() {
        assert_eq!(first_safe_cut(b"\nab", 0, 3), None);
        assert_eq!(first_safe_cut(b"ab\n", 0, 3), None);
        // The character after the newline is incomplete: the rest of `é` is missing.
        assert_eq!(first_safe_cut(&"ab\né".as_bytes()[..4], 0, 4), None);
    }

    #[test]
    fn multibyte_neighbors_are_decoded() {
        let text = "日本\n語";
        assert_eq!(first_safe_cut(text.as_bytes(), 0, text.len()), Some(7));
    }

    #[test]
    fn split_prefers_cuts_within_limit() {
        let text = "aaaa\nbbbb\ncccc\ndddd";
        assert_eq!(split_at_safe_cuts(text, 12), ["aaaa\nbbbb\n", "cccc\ndddd"]);
        assert_eq!(split_at_safe_cuts(text, 5), ["aaaa\n", "bbbb\n", "cccc\n", "dddd"]);
    }

    #[test]
    fn split_grows_past_limit_to_next_cut() {
        let text = "aaaaaaaaaa\nbb";
        assert_eq!(split_at_safe_cuts(text, 4), ["aaaaaaaaaa\n", "bb"]);
        let uncuttable = "one line without any newline";
        assert_eq!(split_at_safe_cuts(uncuttable, 4), [uncuttable]);
    }
}
