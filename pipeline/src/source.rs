//! The record source: which shard files a replica reads, in which order, and how their
//! records are mixed. Per epoch: the file list is shuffled (train) with a seed derived from
//! `(seed, epoch)`, replica `rank` takes every `world_size`-th file, `cycle_length` files are
//! read round-robin one record at a time (tf.data's interleave), and records pass through a
//! shuffle buffer. Every record gets a sequence number within the epoch; everything random
//! downstream is keyed on `(seed, epoch, sequence number)`, so the stream does not depend on
//! thread timing. Corrupt records are skipped and counted, with file and offset logged.

use std::collections::VecDeque;
use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::tfrecord::RecordReader;

/// How records are drawn from the shards.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub files: Vec<PathBuf>,
    pub rank: usize,
    pub world_size: usize,
    /// Shuffle the file order each epoch.
    pub shuffle_files: bool,
    /// Files read at once, round-robin (1 = file order).
    pub cycle_length: usize,
    /// Shuffle buffer size in records (0 or 1 = no shuffling).
    pub shuffle_buffer: usize,
    pub seed: u64,
}

/// One record on its way through the pipeline.
#[derive(Debug, Clone)]
pub struct SourceRecord {
    pub epoch: u64,
    /// Position of the record in this replica's stream for the epoch.
    pub sequence: u64,
    pub payload: Bytes,
    pub file: Arc<PathBuf>,
    pub offset: u64,
}

/// A corrupt record that was skipped.
#[derive(Debug, Clone)]
pub struct SkippedRecordInfo {
    pub file: Arc<PathBuf>,
    pub offset: u64,
    pub reason: String,
}

/// SplitMix64 finalizer: decorrelates seeds built from small integers.
pub fn mix_seed(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        h ^= p.wrapping_add(0x9E37_79B9_7F4A_7C15);
        h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^= h >> 31;
    }
    h
}

impl SourceConfig {
    /// The files replica `rank` reads in `epoch`, in reading order.
    pub fn epoch_files(&self, epoch: u64) -> Vec<PathBuf> {
        let mut files = self.files.clone();
        if self.shuffle_files {
            let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[self.seed, epoch, 0xF11E]));
            files.shuffle(&mut rng);
        }
        files
            .into_iter()
            .skip(self.rank)
            .step_by(self.world_size.max(1))
            .collect()
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.files.is_empty(), "no input files");
        anyhow::ensure!(self.world_size >= 1, "world_size must be at least 1");
        anyhow::ensure!(
            self.rank < self.world_size,
            "rank {} ≥ world_size {}",
            self.rank,
            self.world_size
        );
        anyhow::ensure!(
            self.files.len() >= self.world_size,
            "{} files cannot be split across {} replicas: write at least one shard per replica",
            self.files.len(),
            self.world_size
        );
        Ok(())
    }
}

/// Iterates over one epoch's records for one replica.
pub struct EpochReader {
    epoch: u64,
    pending_files: VecDeque<PathBuf>,
    open: Vec<(Arc<PathBuf>, RecordReader<BufReader<File>>)>,
    cursor: usize,
    cycle_length: usize,
    buffer: Vec<SourceRecord>,
    buffer_size: usize,
    rng: ChaCha8Rng,
    sequence: u64,
    pub skipped: Vec<SkippedRecordInfo>,
}

impl EpochReader {
    pub fn new(cfg: &SourceConfig, epoch: u64) -> EpochReader {
        EpochReader {
            epoch,
            pending_files: cfg.epoch_files(epoch).into(),
            open: Vec::new(),
            cursor: 0,
            cycle_length: cfg.cycle_length.max(1),
            buffer: Vec::new(),
            buffer_size: cfg.shuffle_buffer.max(1),
            rng: ChaCha8Rng::seed_from_u64(mix_seed(&[cfg.seed, epoch, cfg.rank as u64, 0x5EED])),
            sequence: 0,
            skipped: Vec::new(),
        }
    }

    /// Next record of the interleaved files, before shuffling.
    fn next_interleaved(&mut self) -> anyhow::Result<Option<SourceRecord>> {
        loop {
            while self.open.len() < self.cycle_length {
                let Some(path) = self.pending_files.pop_front() else {
                    break;
                };
                let reader = RecordReader::open(&path)?.skip_corrupt(true);
                self.open.push((Arc::new(path), reader));
            }
            if self.open.is_empty() {
                return Ok(None);
            }
            if self.cursor >= self.open.len() {
                self.cursor = 0;
            }
            let (path, reader) = &mut self.open[self.cursor];
            let before = reader.skipped().len();
            let next = reader.next_record()?;
            for s in &reader.skipped()[before..] {
                eprintln!(
                    "warning: skipping corrupt record in {} at byte offset {}: {}",
                    path.display(),
                    s.offset,
                    s.fault
                );
                self.skipped.push(SkippedRecordInfo {
                    file: path.clone(),
                    offset: s.offset,
                    reason: s.fault.to_string(),
                });
            }
            match next {
                Some(rec) => {
                    let item = SourceRecord {
                        epoch: self.epoch,
                        sequence: 0,
                        payload: rec.payload,
                        file: path.clone(),
                        offset: rec.offset,
                    };
                    self.cursor += 1;
                    return Ok(Some(item));
                }
                None => {
                    // Keep the round-robin position: the next file takes this slot.
                    self.open.remove(self.cursor);
                    if let Some(path) = self.pending_files.pop_front() {
                        let reader = RecordReader::open(&path)?.skip_corrupt(true);
                        self.open.insert(self.cursor, (Arc::new(path), reader));
                    }
                }
            }
        }
    }

    /// Next record after the shuffle buffer, numbered.
    pub fn next_record(&mut self) -> anyhow::Result<Option<SourceRecord>> {
        while self.buffer.len() < self.buffer_size {
            match self.next_interleaved()? {
                Some(r) => self.buffer.push(r),
                None => break,
            }
        }
        if self.buffer.is_empty() {
            return Ok(None);
        }
        let pick = if self.buffer_size > 1 {
            self.rng.gen_range(0..self.buffer.len())
        } else {
            0
        };
        let mut rec = if self.buffer_size > 1 {
            self.buffer.swap_remove(pick)
        } else {
            self.buffer.remove(0)
        };
        rec.sequence = self.sequence;
        self.sequence += 1;
        Ok(Some(rec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tfrecord::AtomicRecordWriter;

    fn shards(dir: &std::path::Path, files: usize, per_file: usize) -> Vec<PathBuf> {
        (0..files)
            .map(|f| {
                let p = dir.join(format!("s-{f:05}-of-{files:05}.tfrecord"));
                let mut w = AtomicRecordWriter::create(&p).unwrap();
                for r in 0..per_file {
                    w.write(format!("{f}:{r}").as_bytes()).unwrap();
                }
                w.finish().unwrap()
            })
            .collect()
    }

    fn read_all(cfg: &SourceConfig, epoch: u64) -> Vec<String> {
        let mut r = EpochReader::new(cfg, epoch);
        let mut out = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            assert_eq!(rec.sequence, out.len() as u64);
            out.push(String::from_utf8(rec.payload.to_vec()).unwrap());
        }
        out
    }

    #[test]
    fn file_order_interleave_and_shuffle() {
        let dir = tempfile::tempdir().unwrap();
        let files = shards(dir.path(), 4, 3);
        let mut cfg = SourceConfig {
            files,
            rank: 0,
            world_size: 1,
            shuffle_files: false,
            cycle_length: 1,
            shuffle_buffer: 0,
            seed: 7,
        };
        let plain = read_all(&cfg, 0);
        assert_eq!(plain[..4], ["0:0", "0:1", "0:2", "1:0"]);
        cfg.cycle_length = 2;
        let inter = read_all(&cfg, 0);
        assert_eq!(inter[..6], ["0:0", "1:0", "0:1", "1:1", "0:2", "1:2"]);
        assert_eq!(inter[6..8], ["2:0", "3:0"]);
        cfg.shuffle_files = true;
        cfg.shuffle_buffer = 5;
        let (e0, e0b, e1) = (read_all(&cfg, 0), read_all(&cfg, 0), read_all(&cfg, 1));
        assert_eq!(e0, e0b, "same seed and epoch give the same order");
        assert_ne!(e0, e1, "epochs differ");
        let mut sorted = e0.clone();
        sorted.sort();
        let mut all = plain.clone();
        all.sort();
        assert_eq!(sorted, all, "each record exactly once");
    }

    #[test]
    fn ranks_partition_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let files = shards(dir.path(), 5, 2);
        let mut seen = Vec::new();
        for rank in 0..2 {
            let cfg = SourceConfig {
                files: files.clone(),
                rank,
                world_size: 2,
                shuffle_files: true,
                cycle_length: 2,
                shuffle_buffer: 3,
                seed: 1,
            };
            cfg.validate().unwrap();
            seen.extend(read_all(&cfg, 3));
        }
        seen.sort();
        assert_eq!(seen.len(), 10);
        seen.dedup();
        assert_eq!(seen.len(), 10);
        let too_many = SourceConfig {
            files: files[..1].to_vec(),
            rank: 0,
            world_size: 2,
            shuffle_files: false,
            cycle_length: 1,
            shuffle_buffer: 0,
            seed: 0,
        };
        assert!(too_many.validate().is_err());
    }
}
