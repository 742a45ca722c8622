//! Training batches: windows of a prepared directory or prompt-masked
//! fine-tuning examples, behind one interface the training loop uses.

use std::path::{Path, PathBuf};

use dagmoe_data::manifest::Split;
use dagmoe_data::{
    Batch, BatchProducer, LoaderCursor, Manifest, MixtureComponent, SftLoader, TextTokenizer, TokenStream, TrainCursor,
    TrainLoader, load_sft,
};
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::eval::{DataIdentity, Unigram, check_manifest};

/// Opens the training batches: windows of a prepared directory (`data.train`),
/// a weighted mixture of several (`data.mixture`), or prompt-masked examples
/// (`data.sft`). Also returns the unigram baseline of the training windows
/// and a hash that identifies the training data.
pub(crate) fn open_training_data(
    config: &RunConfig,
    tokenizer: &TextTokenizer,
    identity: &DataIdentity,
) -> Result<(BatchSource, Option<Unigram>, String)> {
    let data = &config.data;
    let train = &config.train;
    let (source, unigram, sha256, origin) = match &data.sft {
        None => {
            let corpora = open_training_corpora(config, identity)?;
            let unigram = training_unigram(&corpora, config.model.vocab_size);
            let sha256 = training_data_sha256(&corpora);
            let origin = corpora.iter().map(|c| c.dir.display().to_string()).collect::<Vec<_>>().join(" + ");
            let components = corpora
                .into_iter()
                .map(|c| MixtureComponent { name: c.name, stream: c.stream, weight: c.weight })
                .collect();
            let loader = TrainLoader::mixture(components, data.seq_len, train.batch_size, train.seed)?;
            (BatchSource::Windows(loader), Some(unigram), sha256, origin)
        }
        Some(path) => {
            let examples = load_sft(path, tokenizer, data.seq_len)?;
            let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
            let loader = SftLoader::new(examples, data.seq_len, train.batch_size, train.seed);
            (BatchSource::Examples(loader), None, dagmoe_data::sha256_hex(&bytes), path.display().to_string())
        }
    };
    let step_rows = train.batch_size * train.grad_accum;
    if step_rows > source.len() {
        return Err(Error::Config(format!(
            "train.batch_size * train.grad_accum = {step_rows} sequences exceed the {} sequences of {origin}; lower train.batch_size",
            source.len(),
        )));
    }
    Ok((source, unigram, sha256))
}

/// The train split of one prepared directory of the training data.
pub(crate) struct TrainingCorpus {
    pub name: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub stream: TokenStream,
    pub weight: f64,
}

/// Opens the train splits named by `data.train` or `data.mixture`, checked
/// against the run's tokenizer and vocabulary.
pub(crate) fn open_training_corpora(config: &RunConfig, identity: &DataIdentity) -> Result<Vec<TrainingCorpus>> {
    let data = &config.data;
    let entries: Vec<(String, String, &Path, f64)> = match &data.train {
        Some(dir) => vec![("train".to_string(), "data.train".to_string(), dir.as_path(), 1.0)],
        None => data
            .mixture
            .iter()
            .map(|(name, entry)| (name.clone(), format!("data.mixture.{name}.path"), entry.path.as_path(), entry.weight))
            .collect(),
    };
    let mut corpora = Vec::with_capacity(entries.len());
    for (name, key, dir, weight) in entries {
        let manifest = Manifest::load(dir).map_err(|e| {
            Error::Config(format!("{key}: {}; run `dagmoe data prepare` or fix the path", Error::with_causes(&e)))
        })?;
        check_manifest(dir, &manifest, identity)?;
        let stream = TokenStream::open(dir, &manifest, Split::Train)?;
        corpora.push(TrainingCorpus { name, dir: dir.to_path_buf(), manifest, stream, weight });
    }
    if corpora.iter().any(|c| c.manifest.bos_id != corpora[0].manifest.bos_id) {
        tracing::warn!(
            "the corpora of data.mixture were prepared with different --bos-token settings, so only some documents start with BOS"
        );
    }
    Ok(corpora)
}

/// Fits the unigram baseline of the training corpora, weighted as in the mixture.
pub(crate) fn training_unigram(corpora: &[TrainingCorpus], vocab_size: usize) -> Unigram {
    let weighted: Vec<(&TokenStream, f64)> = corpora.iter().map(|c| (&c.stream, c.weight)).collect();
    Unigram::fit_mixture(&weighted, vocab_size)
}

/// Hash over the corpus names, weights and shard checksums: a saved loader
/// position is meaningful only for the same token streams in the same mixture.
fn training_data_sha256(corpora: &[TrainingCorpus]) -> String {
    let shard_checksums = |corpus: &TrainingCorpus| -> String {
        corpus.manifest.train.shards.iter().map(|s| s.sha256.as_str()).collect::<Vec<_>>().join(",")
    };
    // A plain data.train keeps the hash of the shard checksums alone, the
    // form checkpoints stored before mixtures existed, so they still resume.
    if let [single] = corpora {
        if single.weight == 1.0 && single.name == "train" {
            return dagmoe_data::sha256_hex(shard_checksums(single).as_bytes());
        }
    }
    let described: Vec<String> =
        corpora.iter().map(|c| format!("{}={}:{}", c.name, c.weight, shard_checksums(c))).collect();
    dagmoe_data::sha256_hex(described.join(";").as_bytes())
}

/// Saved position of a [`BatchSource`]. The JSON forms differ by their
/// fields, so checkpoints store it without a tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DataCursor {
    Windows(TrainCursor),
    Examples(LoaderCursor),
}

/// Where training batches come from.
pub(crate) enum BatchSource {
    Windows(TrainLoader),
    Examples(SftLoader),
}

impl BatchSource {
    /// Moves to a saved position; fails when the cursor belongs to another kind of data.
    pub(crate) fn restore(&mut self, cursor: &DataCursor) -> Result<()> {
        match (self, cursor) {
            (BatchSource::Windows(loader), DataCursor::Windows(cursor)) => Ok(loader.restore(cursor)?),
            (BatchSource::Examples(loader), DataCursor::Examples(cursor)) => {
                loader.restore(*cursor);
                Ok(())
            }
            _ => Err(Error::Config(
                "the checkpoint's data position is for another kind of training data (windows against fine-tuning examples); resume with the data the run started with".into(),
            )),
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

impl BatchProducer for BatchSource {
    type Cursor = DataCursor;

    fn next_batch(&mut self) -> Batch {
        match self {
            BatchSource::Windows(loader) => loader.next_batch(),
            BatchSource::Examples(loader) => loader.next_batch(),
        }
    }

    fn cursor(&self) -> DataCursor {
        match self {
            BatchSource::Windows(loader) => DataCursor::Windows(loader.cursor()),
            BatchSource::Examples(loader) => DataCursor::Examples(loader.cursor()),
        }
    }
}
