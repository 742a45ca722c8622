//! Measures how fast the training loader produces batches from a prepared
//! directory, read on the calling thread and through the prefetch thread.
//!
//! Usage: `loader_throughput DIR SEQ_LEN BATCH_SIZE [SECONDS]`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use dagmoe_data::manifest::Split;
use dagmoe_data::{Manifest, Prefetcher, TokenStream, TrainLoader};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        return Err("usage: loader_throughput DIR SEQ_LEN BATCH_SIZE [SECONDS]".into());
    }
    let dir = PathBuf::from(&args[0]);
    let seq_len: usize = args[1].parse()?;
    let batch_size: usize = args[2].parse()?;
    let seconds: f64 = args.get(3).map_or(Ok(3.0), |s| s.parse())?;

    let manifest = Manifest::load(&dir)?;
    let open = || -> Result<TrainLoader, dagmoe_data::DataError> {
        let stream = TokenStream::open(&dir, &manifest, Split::Train)?;
        TrainLoader::new(stream, seq_len, batch_size, 0)
    };

    let opened = Instant::now();
    let mut loader = open()?;
    let open_time = opened.elapsed();
    let inline = measure(|| loader.next_batch().tokens.len(), seconds);

    let mut prefetcher = Prefetcher::start(open()?, 4);
    let prefetched = measure(|| prefetcher.next_batch().tokens.len(), seconds);

    println!("loader: {} (seq_len {seq_len}, batch_size {batch_size})", dir.display());
    println!("open and verify shards: {:.3} s", open_time.as_secs_f64());
    for (label, (batches, elapsed)) in [("on the calling thread", inline), ("through the prefetch thread", prefetched)] {
        let per_second = batches as f64 / elapsed.as_secs_f64();
        println!(
            "{label}: {per_second:.0} batches/s, {:.0} tokens/s",
            per_second * (batch_size * seq_len) as f64
        );
    }
    Ok(())
}

/// Calls `next` for about `seconds` and returns the calls made and the time taken.
fn measure(mut next: impl FnMut() -> usize, seconds: f64) -> (u64, Duration) {
    let started = Instant::now();
    let mut batches = 0u64;
    let mut checksum = 0usize;
    while started.elapsed().as_secs_f64() < seconds {
        checksum = checksum.wrapping_add(next());
        batches += 1;
    }
    std::hint::black_box(checksum);
    (batches, started.elapsed())
}
