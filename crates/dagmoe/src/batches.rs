//! Training batches: windows of a prepared directory or prompt-masked
//! fine-tuning examples, behind one interface the training loop uses.

use dagmoe_data::manifest::Split;
use dagmoe_data::{Batch, LoaderCursor, Manifest, SftLoader, TextTokenizer, TokenStream, TrainLoader, load_sft};

use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::eval::{DataIdentity, Unigram, check_manifest};

/// Opens the training batches: windows of a prepared directory (`data.train`)
/// or prompt-masked examples (`data.sft`). Also returns the unigram baseline
/// of a prepared directory and a hash that identifies the training data.
pub(crate) fn open_training_data(
    config: &RunConfig,
    tokenizer: &TextTokenizer,
    identity: &DataIdentity,
) -> Result<(BatchSource, Option<Unigram>, String)> {
    let data = &config.data;
    let train = &config.train;
    let (source, unigram, sha256, origin) = match (&data.train, &data.sft) {
        (Some(dir), _) => {
            let manifest = Manifest::load(dir).map_err(|e| {
                Error::Config(format!("data.train: {}; run `dagmoe data prepare` or fix the path", Error::with_causes(&e)))
            })?;
            check_manifest(dir, &manifest, identity)?;
            let stream = TokenStream::open(dir, &manifest, Split::Train)?;
            let shard_checksums: Vec<&str> = manifest.train.shards.iter().map(|s| s.sha256.as_str()).collect();
            let sha256 = dagmoe_data::sha256_hex(shard_checksums.join(",").as_bytes());
            let unigram = Unigram::fit(&stream, config.model.vocab_size);
            let loader = TrainLoader::new(stream, data.seq_len, train.batch_size, train.seed)?;
            (BatchSource::Windows(loader), Some(unigram), sha256, dir)
        }
        (None, Some(path)) => {
            let examples = load_sft(path, tokenizer, data.seq_len)?;
            let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
            let loader = SftLoader::new(examples, data.seq_len, train.batch_size, train.seed);
            (BatchSource::Examples(loader), None, dagmoe_data::sha256_hex(&bytes), path)
        }
        (None, None) => unreachable!("validation requires data.train or data.sft"),
    };
    let step_rows = train.batch_size * train.grad_accum;
    if step_rows > source.len() {
        return Err(Error::Config(format!(
            "train.batch_size * train.grad_accum = {step_rows} sequences exceed the {} sequences of {}; lower train.batch_size",
            source.len(),
            origin.display()
        )));
    }
    Ok((source, unigram, sha256))
}

/// Where training batches come from.
pub(crate) enum BatchSource {
    Windows(TrainLoader),
    Examples(SftLoader),
}

impl BatchSource {
    pub(crate) fn next_batch(&mut self) -> Batch {
        match self {
            BatchSource::Windows(loader) => loader.next_batch(),
            BatchSource::Examples(loader) => loader.next_batch(),
        }
    }

    pub(crate) fn cursor(&self) -> LoaderCursor {
        match self {
            BatchSource::Windows(loader) => loader.cursor(),
            BatchSource::Examples(loader) => loader.cursor(),
        }
    }

    pub(crate) fn restore(&mut self, cursor: LoaderCursor) {
        match self {
            BatchSource::Windows(loader) => loader.restore(cursor),
            BatchSource::Examples(loader) => loader.restore(cursor),
        }
    }

    /// Sequences per epoch.
    pub(crate) fn len(&self) -> usize {
        match self {
            BatchSource::Windows(loader) => loader.windows(),
            BatchSource::Examples(loader) => loader.examples(),
        }
    }
}
