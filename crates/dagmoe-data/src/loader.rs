//! Streaming windows of `seq_len + 1` tokens over a split's shards.
//!
//! A split is one token stream: the shards in manifest order, each document
//! followed by EOS. Window `w` covers tokens `w * seq_len ..= (w + 1) * seq_len`,
//! so consecutive windows share one token and every token after the first is
//! a target exactly once per epoch.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::manifest::{Manifest, Split};
use crate::rng::{SplitMix64, permutation};
use crate::shard::Shard;
use crate::{DataError, Result};

/// The concatenated tokens of one split, memory-mapped.
pub struct TokenStream {
    shards: Vec<Shard>,
    /// `starts[i]` is the stream position of the first token of shard `i`.
    starts: Vec<u64>,
    len: u64,
}

impl TokenStream {
    /// Opens every shard of `split` under `dir` and verifies it against the manifest.
    pub fn open(dir: &Path, manifest: &Manifest, split: Split) -> Result<Self> {
        let mut shards = Vec::new();
        let mut starts = Vec::new();
        let mut len = 0;
        for info in &manifest.split(split).shards {
            let shard = Shard::open(&dir.join(&info.file), info.tokens, &info.sha256, manifest.vocab_size)?;
            starts.push(len);
            len += shard.len();
            shards.push(shard);
        }
        Ok(Self { shards, starts, len })
    }

    /// Builds a stream from in-memory shards, for tests.
    pub fn from_shards(shards: Vec<Shard>) -> Self {
        let mut starts = Vec::new();
        let mut len = 0;
        for shard in &shards {
            starts.push(len);
            len += shard.len();
        }
        Self { shards, starts, len }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies tokens `start..start + out.len()` of the stream into `out`, across shard boundaries.
    pub fn read(&self, start: u64, out: &mut [u32]) {
        assert!(start + out.len() as u64 <= self.len, "read past the end of the token stream");
        let mut shard = self.starts.partition_point(|&s| s <= start) - 1;
        let mut position = start;
        let mut written = 0;
        while written < out.len() {
            let offset = position - self.starts[shard];
            let available = (self.shards[shard].len() - offset) as usize;
            let take = available.min(out.len() - written);
            self.shards[shard].read(offset, &mut out[written..written + take]);
            written += take;
            position += take as u64;
            shard += 1;
        }
    }
}

/// A batch of windows: `rows` windows of `seq_len + 1` tokens, row-major.
/// Row `r` has targets `tokens[r][1..=target_lengths[r]]` (tokens past them
/// are padding) and scores those from index `score_from[r]` on, so that a
/// sliding evaluation scores each token once.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub rows: usize,
    pub seq_len: usize,
    pub target_lengths: Vec<usize>,
    pub score_from: Vec<usize>,
}

impl Batch {
    /// Number of scored target tokens in the batch.
    pub fn target_count(&self) -> usize {
        self.target_lengths.iter().zip(&self.score_from).map(|(len, from)| len - from).sum()
    }

    /// The scored target ids of row `row`.
    pub fn scored_targets(&self, row: usize) -> &[u32] {
        let start = row * (self.seq_len + 1);
        &self.tokens[start + 1 + self.score_from[row]..=start + self.target_lengths[row]]
    }
}

/// Position of a [`TrainLoader`] in its data order, saved in checkpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderCursor {
    pub epoch: u64,
    /// Index of the next window in this epoch's permutation.
    pub index: u64,
}

/// A seeded permutation of `0..len` per epoch, reproducible from the seed,
/// a salt that tells loaders apart, and the epoch; and a cursor into it.
pub struct EpochOrder {
    seed: u64,
    salt: u64,
    cursor: LoaderCursor,
    order: Vec<u32>,
}

impl EpochOrder {
    pub fn new(len: usize, seed: u64, salt: u64) -> Self {
        Self { seed, salt, cursor: LoaderCursor::default(), order: Self::permute(len, seed, salt, 0) }
    }

    fn permute(len: usize, seed: u64, salt: u64, epoch: u64) -> Vec<u32> {
        let mut mixer = SplitMix64::new(seed ^ epoch.wrapping_mul(salt));
        permutation(len, mixer.next_u64())
    }

    /// Items per epoch.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn cursor(&self) -> LoaderCursor {
        self.cursor
    }

    /// Moves to a saved position; the next item is the one that followed it.
    pub fn restore(&mut self, cursor: LoaderCursor) {
        if cursor.epoch != self.cursor.epoch {
            self.order = Self::permute(self.order.len(), self.seed, self.salt, cursor.epoch);
        }
        self.cursor = cursor;
    }

    /// Returns the next item, moving to the next epoch's order when one ends.
    pub fn next_item(&mut self) -> usize {
        if self.cursor.index as usize == self.order.len() {
            self.restore(LoaderCursor { epoch: self.cursor.epoch + 1, index: 0 });
        }
        let item = self.order[self.cursor.index as usize] as usize;
        self.cursor.index += 1;
        item
    }
}

/// One corpus of a training mixture: a token stream and its sampling weight.
pub struct MixtureComponent {
    pub name: String,
    pub stream: TokenStream,
    pub weight: f64,
}

/// Position of a [`TrainLoader`], saved in checkpoints: the rows drawn so far
/// and each corpus's position in its own window order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainCursor {
    pub rows: u64,
    pub corpora: Vec<LoaderCursor>,
}

struct Corpus {
    name: String,
    stream: TokenStream,
    order: EpochOrder,
    /// Upper end of this corpus's interval in `[0, 1)` of the weighted draw.
    cumulative_weight: f64,
}

/// Training windows in a seeded order that changes every epoch, drawn from
/// one corpus or from a weighted mixture of several.
///
/// Each row first draws its corpus, with the corpus weights as probabilities,
/// then takes the next window of that corpus's own epoch order. The draw for
/// row `r` depends only on the seed and `r`, so a cursor of `r` and the
/// per-corpus positions restores the exact sequence.
pub struct TrainLoader {
    corpora: Vec<Corpus>,
    seq_len: usize,
    batch_size: usize,
    pick_seed: u64,
    rows: u64,
}

const WINDOW_ORDER_SALT: u64 = 0xD1B5_4A32_D192_ED03;
const PICK_SALT: u64 = 0x6A09_E667_F3BC_C909;
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl TrainLoader {
    /// Windows of a single token stream.
    pub fn new(stream: TokenStream, seq_len: usize, batch_size: usize, seed: u64) -> Result<Self> {
        Self::mixture(vec![MixtureComponent { name: "train".into(), stream, weight: 1.0 }], seq_len, batch_size, seed)
    }

    /// Windows of several corpora, each row drawn from corpus `i` with
    /// probability `weight_i / sum(weights)`.
    pub fn mixture(components: Vec<MixtureComponent>, seq_len: usize, batch_size: usize, seed: u64) -> Result<Self> {
        if components.is_empty() {
            return Err(DataError::Invalid("a training mixture needs at least one corpus".into()));
        }
        let total_weight: f64 = components.iter().map(|c| c.weight).sum();
        if !total_weight.is_finite() {
            return Err(DataError::Invalid(format!(
                "the mixture weights sum to {total_weight}; use finite weights such as 0.7 and 0.3"
            )));
        }
        let mut corpora = Vec::with_capacity(components.len());
        let mut cumulative = 0.0;
        for (index, component) in components.into_iter().enumerate() {
            if !(component.weight.is_finite() && component.weight > 0.0) {
                return Err(DataError::Invalid(format!(
                    "corpus {} has weight {}; give every corpus of a mixture a positive weight",
                    component.name, component.weight
                )));
            }
            let windows = window_count(component.stream.len(), seq_len);
            if windows == 0 {
                return Err(DataError::Invalid(format!(
                    "corpus {} has {} training tokens, fewer than seq_len + 1 = {}; prepare more data or lower data.seq_len",
                    component.name,
                    component.stream.len(),
                    seq_len + 1
                )));
            }
            if windows > u32::MAX as u64 {
                return Err(DataError::Invalid(format!(
                    "corpus {} has {windows} windows, more than the loader's limit of 2^32",
                    component.name
                )));
            }
            // Corpus 0 keeps the plain seed, so a single-corpus loader's order
            // does not depend on whether it was built as a mixture.
            let corpus_seed = seed.wrapping_add((index as u64).wrapping_mul(GOLDEN_GAMMA));
            cumulative += component.weight / total_weight;
            corpora.push(Corpus {
                name: component.name,
                stream: component.stream,
                order: EpochOrder::new(windows as usize, corpus_seed, WINDOW_ORDER_SALT),
                cumulative_weight: cumulative,
            });
        }
        Ok(Self { corpora, seq_len, batch_size, pick_seed: seed ^ PICK_SALT, rows: 0 })
    }

    /// Windows per epoch, summed over the corpora.
    pub fn windows(&self) -> usize {
        self.corpora.iter().map(|c| c.order.len()).sum()
    }

    /// Names of the corpora in mixture order.
    pub fn corpus_names(&self) -> Vec<&str> {
        self.corpora.iter().map(|c| c.name.as_str()).collect()
    }

    pub fn cursor(&self) -> TrainCursor {
        TrainCursor { rows: self.rows, corpora: self.corpora.iter().map(|c| c.order.cursor()).collect() }
    }

    /// Moves to a saved position; the next batch is the one that followed it.
    /// Fails when the cursor was saved by a loader over another number of corpora.
    pub fn restore(&mut self, cursor: &TrainCursor) -> Result<()> {
        if cursor.corpora.len() != self.corpora.len() {
            return Err(DataError::Invalid(format!(
                "the saved data position covers {} corpora but the loader has {}; resume with the data the run started with",
                cursor.corpora.len(),
                self.corpora.len()
            )));
        }
        for (corpus, saved) in self.corpora.iter_mut().zip(&cursor.corpora) {
            corpus.order.restore(*saved);
        }
        self.rows = cursor.rows;
        Ok(())
    }

    /// Index of the corpus that row `row` draws from.
    fn corpus_for_row(&self, row: u64) -> usize {
        if self.corpora.len() == 1 {
            return 0;
        }
        let bits = SplitMix64::new(self.pick_seed.wrapping_add(row.wrapping_mul(GOLDEN_GAMMA))).next_u64();
        let uniform = (bits >> 11) as f64 / (1u64 << 53) as f64;
        self.corpora.iter().position(|c| uniform < c.cumulative_weight).unwrap_or(self.corpora.len() - 1)
    }

    /// Returns the next `batch_size` windows, moving each corpus to its next
    /// epoch's order when one ends.
    pub fn next_batch(&mut self) -> Batch {
        let width = self.seq_len + 1;
        let mut tokens = vec![0u32; self.batch_size * width];
        for row in tokens.chunks_mut(width) {
            let corpus_index = self.corpus_for_row(self.rows);
            self.rows += 1;
            let corpus = &mut self.corpora[corpus_index];
            let window = corpus.order.next_item() as u64;
            corpus.stream.read(window * self.seq_len as u64, row);
        }
        Batch {
            tokens,
            rows: self.batch_size,
            seq_len: self.seq_len,
            target_lengths: vec![self.seq_len; self.batch_size],
            score_from: vec![0; self.batch_size],
        }
    }
}

fn window_count(tokens: u64, seq_len: usize) -> u64 {
    tokens.saturating_sub(1) / seq_len as u64
}

/// Sequential evaluation windows that score every token after the first
/// exactly once, the last partial window included (padded, padding unscored).
///
/// With `stride == seq_len` the windows do not overlap. A smaller stride
/// slides them: each window after the first scores only the targets the
/// previous window did not reach, so every scored token sees at least
/// `seq_len - stride` tokens of context.
pub struct EvalBatches<'a> {
    stream: &'a TokenStream,
    seq_len: usize,
    stride: usize,
    batch_size: usize,
    next_start: u64,
    /// Stream position of the last target scored so far.
    covered: u64,
    /// Stream position after the last token to score.
    end: u64,
}

impl<'a> EvalBatches<'a> {
    /// Covers the whole stream, or its first `max_tokens` targets when given.
    /// `stride` must be in `1..=seq_len`.
    pub fn new(stream: &'a TokenStream, seq_len: usize, stride: usize, batch_size: usize, max_tokens: Option<u64>) -> Self {
        assert!((1..=seq_len).contains(&stride), "stride {stride} outside 1..={seq_len}");
        let end = match max_tokens {
            Some(limit) => stream.len().min(limit + 1),
            None => stream.len(),
        };
        Self { stream, seq_len, stride, batch_size, next_start: 0, covered: 0, end }
    }
}

impl Iterator for EvalBatches<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let width = self.seq_len + 1;
        let mut batch = Batch { tokens: Vec::new(), rows: 0, seq_len: self.seq_len, target_lengths: Vec::new(), score_from: Vec::new() };
        while batch.rows < self.batch_size && self.covered + 1 < self.end {
            let start = self.next_start;
            let targets = (self.end - start - 1).min(self.seq_len as u64) as usize;
            let mut row = vec![0u32; width];
            self.stream.read(start, &mut row[..targets + 1]);
            batch.tokens.extend_from_slice(&row);
            batch.target_lengths.push(targets);
            batch.score_from.push(self.covered.saturating_sub(start) as usize);
            batch.rows += 1;
            self.covered = start + targets as u64;
            self.next_start += self.stride as u64;
        }
        (batch.rows > 0).then_some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::write_shard;

    /// Builds a stream of `sizes.len()` shards whose tokens equal their stream position.
    fn positional_stream(dir: &Path, sizes: &[u64]) -> TokenStream {
        offset_stream(dir, sizes, 0)
    }

    /// Like [`positional_stream`], with every token shifted by `offset`.
    fn offset_stream(dir: &Path, sizes: &[u64], offset: u32) -> TokenStream {
        let mut shards = Vec::new();
        let mut next = offset;
        for (i, &size) in sizes.iter().enumerate() {
            let tokens: Vec<u32> = (next..next + size as u32).collect();
            next += size as u32;
            let path = dir.join(format!("s{offset}-{i}.bin"));
            let sha = write_shard(&path, &tokens, 4).unwrap();
            shards.push(Shard::open(&path, size, &sha, u32::MAX as usize).unwrap());
        }
        TokenStream::from_shards(shards)
    }

    #[test]
    fn windows_cross_shard_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let stream = positional_stream(dir.path(), &[5, 3, 11]);
        let mut out = vec![0; 9];
        stream.read(4, &mut out);
        assert_eq!(out, (4..13).collect::<Vec<u32>>());
    }

    #[test]
    fn epoch_covers_each_window_once() {
        let dir = tempfile::tempdir().unwrap();
        let stream = positional_stream(dir.path(), &[50, 37, 13]);
        let seq_len = 7;
        let mut loader = TrainLoader::new(stream, seq_len, 2, 3).unwrap();
        let windows = loader.windows();
        assert_eq!(windows, 99 / 7);
        let mut starts = Vec::new();
        let mut first_epoch = Vec::new();
        for _ in 0..windows {
            let batch = loader.next_batch();
            for row in batch.tokens.chunks(seq_len + 1) {
                assert_eq!(row.to_vec(), (row[0]..row[0] + 8).collect::<Vec<u32>>(), "targets are inputs shifted by one");
                starts.push(row[0]);
            }
        }
        // Two epochs were consumed (2 rows per batch); each contains every window once.
        first_epoch.extend_from_slice(&starts[..windows]);
        let mut second_epoch = starts[windows..].to_vec();
        first_epoch.sort_unstable();
        second_epoch.sort_unstable();
        let expected: Vec<u32> = (0..windows as u32).map(|w| w * seq_len as u32).collect();
        assert_eq!(first_epoch, expected);
        assert_eq!(second_epoch, expected);
        assert_ne!(starts[..windows], starts[windows..], "each epoch has its own order");
    }

    #[test]
    fn restore_continues_identically() {
        let dir = tempfile::tempdir().unwrap();
        let mut reference = TrainLoader::new(positional_stream(dir.path(), &[64, 64]), 5, 3, 11).unwrap();
        let batches: Vec<Batch> = (0..20).map(|_| reference.next_batch()).collect();
        for stop in [0, 1, 7, 8, 19] {
            let mut first = TrainLoader::new(positional_stream(dir.path(), &[64, 64]), 5, 3, 11).unwrap();
            for _ in 0..stop {
                first.next_batch();
            }
            let cursor = first.cursor();
            let mut resumed = TrainLoader::new(positional_stream(dir.path(), &[64, 64]), 5, 3, 11).unwrap();
            resumed.restore(&cursor).unwrap();
            assert_eq!(resumed.next_batch(), batches[stop], "batch after a resume at {stop}");
        }
    }

    #[test]
    fn eval_windows_score_each_token_once() {
        let dir = tempfile::tempdir().unwrap();
        let stream = positional_stream(dir.path(), &[10, 13]);
        let mut scored = Vec::new();
        for batch in EvalBatches::new(&stream, 4, 4, 2, None) {
            for row in 0..batch.rows {
                scored.extend_from_slice(batch.scored_targets(row));
            }
        }
        assert_eq!(scored, (1..23).collect::<Vec<u32>>());
    }

    #[test]
    fn sliding_windows_score_each_token_once() {
        let dir = tempfile::tempdir().unwrap();
        let stream = positional_stream(dir.path(), &[10, 13]);
        for stride in [1, 2, 3, 5] {
            let mut scored = Vec::new();
            for batch in EvalBatches::new(&stream, 5, stride, 3, None) {
                for row in 0..batch.rows {
                    let first_window = batch.tokens[row * 6] == 0;
                    let context = batch.score_from[row];
                    assert!(first_window || context >= 5 - stride, "stride {stride}: scored with {context} tokens of context");
                    scored.extend_from_slice(batch.scored_targets(row));
                }
            }
            assert_eq!(scored, (1..23).collect::<Vec<u32>>(), "stride {stride}");
        }
    }

    #[test]
    fn eval_token_limit_is_respected() {
        let dir = tempfile::tempdir().unwrap();
        let stream = positional_stream(dir.path(), &[100]);
        let scored: usize = EvalBatches::new(&stream, 8, 8, 3, Some(30)).map(|b| b.target_count()).sum();
        assert_eq!(scored, 30);
    }

    const SECOND: u32 = 1_000_000;

    fn two_corpus_loader(dir: &Path, weights: [f64; 2], seed: u64) -> TrainLoader {
        let components = vec![
            MixtureComponent { name: "a".into(), stream: offset_stream(dir, &[40, 23], 0), weight: weights[0] },
            MixtureComponent { name: "b".into(), stream: offset_stream(dir, &[31], SECOND), weight: weights[1] },
        ];
        TrainLoader::mixture(components, 4, 3, seed).unwrap()
    }

    #[test]
    fn mixture_draws_rows_by_weight() {
        let dir = tempfile::tempdir().unwrap();
        let mut loader = two_corpus_loader(dir.path(), [3.0, 1.0], 5);
        let mut from_second = 0;
        let batches = 1000;
        for _ in 0..batches {
            let batch = loader.next_batch();
            for row in batch.tokens.chunks(5) {
                assert_eq!(row.to_vec(), (row[0]..row[0] + 5).collect::<Vec<u32>>(), "a window stays inside one corpus");
                from_second += usize::from(row[0] >= SECOND);
            }
        }
        let share = from_second as f64 / (batches * 3) as f64;
        assert!((share - 0.25).abs() < 0.03, "corpus b drew {share:.3} of the rows, expected 0.25");
    }

    #[test]
    fn mixture_epochs_cover_each_corpus_window_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut loader = two_corpus_loader(dir.path(), [1.0, 1.0], 9);
        let mut second_starts = Vec::new();
        // Corpus b has 30 / 4 = 7 windows; collect its first 7 draws.
        while second_starts.len() < 7 {
            for row in loader.next_batch().tokens.chunks(5) {
                if row[0] >= SECOND && second_starts.len() < 7 {
                    second_starts.push(row[0] - SECOND);
                }
            }
        }
        second_starts.sort_unstable();
        assert_eq!(second_starts, (0..7).map(|w| w * 4).collect::<Vec<u32>>());
    }

    #[test]
    fn mixture_restore_continues_identically() {
        let dir = tempfile::tempdir().unwrap();
        let mut reference = two_corpus_loader(dir.path(), [2.0, 1.0], 13);
        // 60 batches of 3 rows run through several epochs of both corpora.
        let batches: Vec<Batch> = (0..60).map(|_| reference.next_batch()).collect();
        for stop in [0, 1, 9, 30, 59] {
            let mut first = two_corpus_loader(dir.path(), [2.0, 1.0], 13);
            for _ in 0..stop {
                first.next_batch();
            }
            let mut resumed = two_corpus_loader(dir.path(), [2.0, 1.0], 13);
            resumed.restore(&first.cursor()).unwrap();
            let mut position = stop;
            // Resume a second time a few batches later.
            for _ in 0..(59 - stop).min(4) {
                assert_eq!(resumed.next_batch(), batches[position], "batch {position} after a resume at {stop}");
                position += 1;
            }
            let mut again = two_corpus_loader(dir.path(), [2.0, 1.0], 13);
            again.restore(&resumed.cursor()).unwrap();
            assert_eq!(again.next_batch(), batches[position], "batch {position} after a second resume");
        }
    }

    #[test]
    fn single_corpus_mixture_matches_plain_loader() {
        let dir = tempfile::tempdir().unwrap();
        let mut plain = TrainLoader::new(positional_stream(dir.path(), &[64, 64]), 5, 3, 11).unwrap();
        let component = MixtureComponent { name: "only".into(), stream: positional_stream(dir.path(), &[64, 64]), weight: 0.5 };
        let mut mixture = TrainLoader::mixture(vec![component], 5, 3, 11).unwrap();
        for _ in 0..30 {
            assert_eq!(plain.next_batch(), mixture.next_batch());
        }
    }

    #[test]
    fn mixture_rejects_bad_weights_and_cursors() {
        let dir = tempfile::tempdir().unwrap();
        let component = MixtureComponent { name: "zero".into(), stream: positional_stream(dir.path(), &[64]), weight: 0.0 };
        let error = TrainLoader::mixture(vec![component], 5, 3, 11).err().expect("zero weight is rejected").to_string();
        assert!(error.contains("zero"), "{error}");
    assert!(error.contains("positive weight"), "{error}");

        let mut loader = two_corpus_loader(dir.path(), [1.0, 1.0], 1);
        let single = TrainCursor { rows: 3, corpora: vec![LoaderCursor::default()] };
        let error = loader.restore(&single).unwrap_err().to_string();
        assert!(error.contains("covers 1 corpora but the loader has 2"), "{error}");
    }
}
