//! Background batch preparation, so the next batch is ready before the
//! training step needs it.
//!
//! A checkpoint must record the loader position after the last batch the
//! step consumed, not after the batches the worker has already read ahead.
//! The worker therefore sends each batch together with the cursor that
//! follows it, and [`Prefetcher::cursor`] returns the cursor of the last
//! batch handed out.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::loader::{Batch, LoaderCursor, TrainCursor, TrainLoader};
use crate::sft::SftLoader;

/// A deterministic source of batches with a saveable position.
pub trait BatchProducer: Send + 'static {
    type Cursor: Clone + Send + 'static;

    fn next_batch(&mut self) -> Batch;

    /// Position after the last batch returned by `next_batch`.
    fn cursor(&self) -> Self::Cursor;
}

impl BatchProducer for TrainLoader {
    type Cursor = TrainCursor;

    fn next_batch(&mut self) -> Batch {
        TrainLoader::next_batch(self)
    }

    fn cursor(&self) -> TrainCursor {
        TrainLoader::cursor(self)
    }
}

impl BatchProducer for SftLoader {
    type Cursor = LoaderCursor;

    fn next_batch(&mut self) -> Batch {
        SftLoader::next_batch(self)
    }

    fn cursor(&self) -> LoaderCursor {
        SftLoader::cursor(self)
    }
}

/// Batches from a producer, read ahead on a worker thread when `depth > 0`.
pub struct Prefetcher<P: BatchProducer> {
    mode: Mode<P>,
    cursor: P::Cursor,
    waited: Duration,
}

enum Mode<P: BatchProducer> {
    Inline(P),
    Threaded { receiver: Option<Receiver<(Batch, P::Cursor)>>, worker: Option<JoinHandle<()>> },
}

impl<P: BatchProducer> Prefetcher<P> {
    /// Starts reading ahead up to `depth` batches; `depth == 0` reads each
    /// batch on the caller's thread when it is requested.
    pub fn start(producer: P, depth: usize) -> Self {
        let cursor = producer.cursor();
        let mode = if depth == 0 {
            Mode::Inline(producer)
        } else {
            let (sender, receiver) = sync_channel(depth);
            let worker = std::thread::Builder::new()
                .name("dagmoe-prefetch".into())
                .spawn(move || produce(producer, sender))
                .expect("failed to spawn the prefetch thread");
            Mode::Threaded { receiver: Some(receiver), worker: Some(worker) }
        };
        Self { mode, cursor, waited: Duration::ZERO }
    }

    /// Returns the next batch, blocking until the worker has it ready.
    ///
    /// # Panics
    /// Re-raises a panic of the producer on the worker thread.
    pub fn next_batch(&mut self) -> Batch {
        let started = Instant::now();
        let batch = match &mut self.mode {
            Mode::Inline(producer) => {
                let batch = producer.next_batch();
                self.cursor = producer.cursor();
                batch
            }
            Mode::Threaded { receiver, worker } => {
                match receiver.as_ref().expect("receiver lives until drop").recv() {
                    Ok((batch, cursor)) => {
                        self.cursor = cursor;
                        batch
                    }
                    Err(_) => {
                        // The worker only closes the channel by ending, and it
                        // ends early only by panicking: surface that panic.
                        match worker.take().map(JoinHandle::join) {
                            Some(Err(payload)) => std::panic::resume_unwind(payload),
                            _ => panic!("the prefetch thread stopped without a batch"),
                        }
                    }
                }
            }
        };
        self.waited += started.elapsed();
        batch
    }

    /// Position after the last batch returned by [`Self::next_batch`].
    pub fn cursor(&self) -> P::Cursor {
        self.cursor.clone()
    }

    /// Returns the time spent in `next_batch` since the last call, and resets it.
    /// With prefetching this is the time the caller stalled on the data.
    pub fn take_wait(&mut self) -> Duration {
        std::mem::take(&mut self.waited)
    }
}

fn produce<P: BatchProducer>(mut producer: P, sender: SyncSender<(Batch, P::Cursor)>) {
    loop {
        let batch = producer.next_batch();
        let cursor = producer.cursor();
        if sender.send((batch, cursor)).is_err() {
            // The receiver was dropped: the prefetcher is shutting down.
            return;
        }
    }
}

impl<P: BatchProducer> Drop for Prefetcher<P> {
    fn drop(&mut self) {
        if let Mode::Threaded { receiver, worker } = &mut self.mode {
            // Dropping the receiver makes the worker's blocked `send` fail, so it returns.
            drop(receiver.take());
            if let Some(worker) = worker.take() {
                let _ = worker.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts up from zero, one row of two tokens per batch.
    struct Counter {
        next: u32,
        panic_at: Option<u32>,
    }

    impl BatchProducer for Counter {
        type Cursor = u32;

        fn next_batch(&mut self) -> Batch {
            if self.panic_at == Some(self.next) {
                panic!("counter reached {}", self.next);
            }
            let tokens = vec![self.next, self.next + 1];
            self.next += 1;
            Batch { tokens, rows: 1, seq_len: 1, target_lengths: vec![1], score_from: vec![0] }
        }

        fn cursor(&self) -> u32 {
            self.next
        }
    }

    #[test]
    fn cursor_follows_consumed_batches_not_read_ahead() {
        let mut prefetcher = Prefetcher::start(Counter { next: 0, panic_at: None }, 4);
        assert_eq!(prefetcher.cursor(), 0);
        for expected in 0..10 {
            // Give the worker time to fill its queue, so read-ahead is real.
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(prefetcher.next_batch().tokens[0], expected);
            assert_eq!(prefetcher.cursor(), expected + 1);
        }
    }

    #[test]
    fn inline_and_threaded_agree() {
        let mut inline = Prefetcher::start(Counter { next: 5, panic_at: None }, 0);
        let mut threaded = Prefetcher::start(Counter { next: 5, panic_at: None }, 2);
        for _ in 0..20 {
            assert_eq!(inline.next_batch(), threaded.next_batch());
            assert_eq!(inline.cursor(), threaded.cursor());
        }
    }

    #[test]
    fn worker_panic_reaches_the_caller() {
        let mut prefetcher = Prefetcher::start(Counter { next: 0, panic_at: Some(3) }, 2);
        for _ in 0..3 {
            prefetcher.next_batch();
        }
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| prefetcher.next_batch()));
        let payload = caught.expect_err("the fourth batch panics");
        let message = payload.downcast_ref::<String>().cloned().unwrap_or_default();
        assert_eq!(message, "counter reached 3");
    }

    #[test]
    fn drop_stops_a_blocked_worker() {
        let mut prefetcher = Prefetcher::start(Counter { next: 0, panic_at: None }, 1);
        prefetcher.next_batch();
        std::thread::sleep(Duration::from_millis(5));
        // The worker is now blocked on a full queue; drop must not hang.
        drop(prefetcher);
    }
}
