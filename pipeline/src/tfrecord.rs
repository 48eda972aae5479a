//! TFRecord framing: `u64 length | u32 masked_crc32c(length) | payload | u32 masked_crc32c(payload)`,
//! all little-endian, exactly as TensorFlow's `TFRecordWriter` writes it (no compression).
//!
//! CRC32C uses the `crc32c` crate, which picks the SSE4.2 / ARMv8 instruction at run time.
//! Every CRC is verified on read. Faults carry the file, the byte offset of the record and
//! what is wrong; [`RecordReader::skip_corrupt`] turns them into counted skips instead.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};

/// Size of the record header: length (8) + masked CRC of the length (4).
pub const HEADER_LEN: usize = 12;
/// Size of the record footer: masked CRC of the payload.
pub const FOOTER_LEN: usize = 4;
/// Largest payload accepted while resynchronising after a corrupt header (1 GiB).
const MAX_PLAUSIBLE_LEN: u64 = 1 << 30;

const MASK_DELTA: u32 = 0xa282_ead8;

/// TensorFlow's CRC mask: rotate right by 15 and add a constant, so CRCs of data that
/// itself contains CRCs stay well distributed.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(MASK_DELTA)
}

/// What is wrong with a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The masked CRC of the 8 length bytes does not match.
    BadLengthCrc { stored: u32, computed: u32 },
    /// The masked CRC of the payload does not match.
    BadPayloadCrc { stored: u32, computed: u32 },
    /// The file ends inside a record.
    Truncated { needed: u64, available: u64 },
    /// The payload is not a valid `tf.train.Example`.
    MalformedExample(String),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::BadLengthCrc { stored, computed } => write!(
                f,
                "bad length CRC (stored {stored:#010x}, computed {computed:#010x})"
            ),
            Fault::BadPayloadCrc { stored, computed } => write!(
                f,
                "bad payload CRC (stored {stored:#010x}, computed {computed:#010x})"
            ),
            Fault::Truncated { needed, available } => write!(
                f,
                "truncated record (needs {needed} more bytes, file has {available})"
            ),
            Fault::MalformedExample(why) => write!(f, "malformed Example: {why}"),
        }
    }
}

/// An error while reading a TFRecord file.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: record {index} at byte offset {offset}: {fault}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        index: u64,
        fault: Fault,
    },
    #[error("{path}: I/O error at byte offset {offset}: {source}")]
    Io {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

impl RecordError {
    /// The byte offset the error refers to.
    pub fn offset(&self) -> u64 {
        match self {
            RecordError::Corrupt { offset, .. } | RecordError::Io { offset, .. } => *offset,
        }
    }
    /// The fault, when the data (not the I/O) is at fault.
    pub fn fault(&self) -> Option<&Fault> {
        match self {
            RecordError::Corrupt { fault, .. } => Some(fault),
            RecordError::Io { .. } => None,
        }
    }
}

/// A corrupt record that was skipped (see [`RecordReader::skip_corrupt`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRecord {
    pub offset: u64,
    pub fault: Fault,
}

/// One record with its position in the file.
#[derive(Debug, Clone)]
pub struct Record {
    /// Byte offset of the record header in the file.
    pub offset: u64,
    /// Zero-based index of the record in the file (corrupt records count too).
    pub index: u64,
    pub payload: Bytes,
}

/// Streaming reader over one TFRecord file (or any `Read + Seek`).
pub struct RecordReader<R> {
    inner: R,
    path: PathBuf,
    offset: u64,
    index: u64,
    file_len: Option<u64>,
    verify: bool,
    skip_corrupt: bool,
    skipped: Vec<SkippedRecord>,
    done: bool,
    scratch: BytesMut,
}

impl RecordReader<BufReader<File>> {
    /// Opens a file for reading.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, RecordError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| RecordError::Io {
            path: path.clone(),
            offset: 0,
            source,
        })?;
        let len = file.metadata().ok().map(|m| m.len());
        let mut reader = RecordReader::new(BufReader::with_capacity(1 << 20, file), &path);
        reader.file_len = len;
        Ok(reader)
    }
}

impl<R: Read + Seek> RecordReader<R> {
    /// Wraps a reader; `path` is only used in error messages.
    pub fn new(inner: R, path: impl AsRef<Path>) -> Self {
        RecordReader {
            inner,
            path: path.as_ref().to_path_buf(),
            offset: 0,
            index: 0,
            file_len: None,
            verify: true,
            skip_corrupt: false,
            skipped: Vec::new(),
            done: false,
            scratch: BytesMut::new(),
        }
    }

    /// Skips corrupt records instead of failing; they are listed by [`Self::skipped`].
    /// After a bad length CRC the reader scans forward for the next valid header.
    pub fn skip_corrupt(mut self, skip: bool) -> Self {
        self.skip_corrupt = skip;
        self
    }

    /// Turns CRC checks off (they are on by default).
    pub fn verify_crc(mut self, verify: bool) -> Self {
        self.verify = verify;
        self
    }

    /// Corrupt records skipped so far.
    pub fn skipped(&self) -> &[SkippedRecord] {
        &self.skipped
    }

    /// Byte offset of the next record.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Reads the next record; `Ok(None)` at a clean end of file.
    pub fn next_record(&mut self) -> Result<Option<Record>, RecordError> {
        loop {
            if self.done {
                return Ok(None);
            }
            match self.read_one() {
                Ok(rec) => return Ok(rec),
                Err(ReadFault::Io(source)) => {
                    self.done = true;
                    return Err(RecordError::Io {
                        path: self.path.clone(),
                        offset: self.offset,
                        source,
                    });
                }
                Err(ReadFault::Data { offset, fault }) => {
                    let index = self.index;
                    self.index += 1;
                    if !self.skip_corrupt {
                        self.done = true;
                        return Err(RecordError::Corrupt {
                            path: self.path.clone(),
                            offset,
                            index,
                            fault,
                        });
                    }
                    let resync = matches!(fault, Fault::BadLengthCrc { .. });
                    let truncated = matches!(fault, Fault::Truncated { .. });
                    self.skipped.push(SkippedRecord { offset, fault });
                    if truncated {
                        self.done = true;
                    } else if resync {
                        self.resync(offset + 1).map_err(|source| RecordError::Io {
                            path: self.path.clone(),
                            offset: self.offset,
                            source,
                        })?;
                    }
                }
            }
        }
    }

    fn read_one(&mut self) -> Result<Option<Record>, ReadFault> {
        let start = self.offset;
        let mut header = [0u8; HEADER_LEN];
        let got = read_full(&mut self.inner, &mut header)?;
        if got == 0 {
            self.done = true;
            return Ok(None);
        }
        if got < HEADER_LEN {
            self.offset += got as u64;
            return Err(ReadFault::Data {
                offset: start,
                fault: Fault::Truncated {
                    needed: (HEADER_LEN - got) as u64,
                    available: 0,
                },
            });
        }
        let len = u64::from_le_bytes(header[..8].try_into().unwrap());
        let stored_len_crc = u32::from_le_bytes(header[8..12].try_into().unwrap());
        if self.verify {
            let computed = masked_crc32c(&header[..8]);
            if computed != stored_len_crc {
                self.offset += HEADER_LEN as u64;
                return Err(ReadFault::Data {
                    offset: start,
                    fault: Fault::BadLengthCrc {
                        stored: stored_len_crc,
                        computed,
                    },
                });
            }
        }
        let body_len = len + FOOTER_LEN as u64;
        if let Some(file_len) = self.file_len {
            let available = file_len.saturating_sub(start + HEADER_LEN as u64);
            if body_len > available {
                self.offset = file_len;
                return Err(ReadFault::Data {
                    offset: start,
                    fault: Fault::Truncated {
                        needed: body_len,
                        available,
                    },
                });
            }
        }
        let body_len = usize::try_from(body_len).map_err(|_| ReadFault::Data {
            offset: start,
            fault: Fault::Truncated {
                needed: body_len,
                available: 0,
            },
        })?;
        self.scratch.clear();
        self.scratch.resize(body_len, 0);
        let got = read_full(&mut self.inner, &mut self.scratch[..])?;
        if got < body_len {
            self.offset = start + (HEADER_LEN + got) as u64;
            return Err(ReadFault::Data {
                offset: start,
                fault: Fault::Truncated {
                    needed: body_len as u64,
                    available: got as u64,
                },
            });
        }
        self.offset = start + (HEADER_LEN + body_len) as u64;
        let mut body = self.scratch.split();
        let footer = body.split_off(len as usize);
        if self.verify {
            let stored = u32::from_le_bytes(footer[..4].try_into().unwrap());
            let computed = masked_crc32c(&body);
            if stored != computed {
                return Err(ReadFault::Data {
                    offset: start,
                    fault: Fault::BadPayloadCrc { stored, computed },
                });
            }
        }
        let index = self.index;
        self.index += 1;
        Ok(Some(Record {
            offset: start,
            index,
            payload: body.freeze(),
        }))
    }

    /// Scans forward from `from` for the next offset holding a header whose length CRC
    /// matches; positions the reader there (or at end of file when none is found).
    fn resync(&mut self, from: u64) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        let mut pos = from;
        let mut buf = vec![0u8; CHUNK + HEADER_LEN];
        loop {
            self.inner.seek(SeekFrom::Start(pos))?;
            let got = read_full_io(&mut self.inner, &mut buf)?;
            if got < HEADER_LEN {
                self.offset = pos + got as u64;
                self.done = true;
                return Ok(());
            }
            for i in 0..=(got - HEADER_LEN) {
                let len_bytes = &buf[i..i + 8];
                let stored = u32::from_le_bytes(buf[i + 8..i + 12].try_into().unwrap());
                let len = u64::from_le_bytes(len_bytes.try_into().unwrap());
                if len <= MAX_PLAUSIBLE_LEN && masked_crc32c(len_bytes) == stored {
                    self.offset = pos + i as u64;
                    self.inner.seek(SeekFrom::Start(self.offset))?;
                    return Ok(());
                }
            }
            if got < buf.len() {
                self.offset = pos + got as u64;
                self.done = true;
                return Ok(());
            }
            pos += (got - HEADER_LEN + 1) as u64;
        }
    }
}

impl<R: Read + Seek> Iterator for RecordReader<R> {
    type Item = Result<Record, RecordError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

enum ReadFault {
    Io(io::Error),
    Data { offset: u64, fault: Fault },
}

impl From<io::Error> for ReadFault {
    fn from(e: io::Error) -> Self {
        ReadFault::Io(e)
    }
}

/// Reads until `buf` is full or EOF; returns the number of bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, ReadFault> {
    Ok(read_full_io(r, buf)?)
}

fn read_full_io(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Frames one record into `out`.
pub fn write_record(out: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let len = (payload.len() as u64).to_le_bytes();
    out.write_all(&len)?;
    out.write_all(&masked_crc32c(&len).to_le_bytes())?;
    out.write_all(payload)?;
    out.write_all(&masked_crc32c(payload).to_le_bytes())?;
    Ok(())
}

/// Writes records to `PATH.tmp-PID`, and renames it to `PATH` only in [`Self::finish`],
/// so an interrupted run never leaves a complete-looking file behind.
pub struct AtomicRecordWriter {
    out: Option<BufWriter<File>>,
    tmp_path: PathBuf,
    final_path: PathBuf,
    records: u64,
    bytes: u64,
}

impl AtomicRecordWriter {
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let final_path = path.as_ref().to_path_buf();
        let mut tmp_name = final_path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp_path = final_path.with_file_name(tmp_name);
        let file = File::create(&tmp_path)?;
        Ok(AtomicRecordWriter {
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            tmp_path,
            final_path,
            records: 0,
            bytes: 0,
        })
    }

    pub fn write(&mut self, payload: &[u8]) -> io::Result<()> {
        let out = self.out.as_mut().expect("writer used after finish");
        write_record(out, payload)?;
        self.records += 1;
        self.bytes += (payload.len() + HEADER_LEN + FOOTER_LEN) as u64;
        Ok(())
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Flushes, syncs and renames the file into place.
    pub fn finish(mut self) -> io::Result<PathBuf> {
        let out = self.out.take().expect("finish called twice");
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.tmp_path, &self.final_path)?;
        Ok(self.final_path.clone())
    }
}

impl Drop for AtomicRecordWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// Expands files, directories (their `*.tfrecord*` files, and any other regular file when
/// none match) and glob patterns into a sorted, de-duplicated list of files.
pub fn expand_paths<S: AsRef<str>>(inputs: &[S]) -> anyhow::Result<Vec<PathBuf>> {
    expand(inputs, |_, _| Ok(()))
}

/// [`expand_paths`] for the input of a training or evaluation run: a directory must hold one
/// shard set. automl names shards `PREFIX-00000-of-00004.tfrecord`, and its converter is run
/// once per split, often into one folder: reading `train-*` and `val-*` together would train
/// on the validation images. A directory with several sets is an error naming them (pass a
/// glob such as `DIR/train-*`, or the files, to choose); a set with shards missing is reported
/// through `warn`.
pub fn expand_shard_paths<S: AsRef<str>>(
    inputs: &[S],
    warn: &mut dyn FnMut(String),
) -> anyhow::Result<Vec<PathBuf>> {
    expand(inputs, |dir, files| {
        let sets = shard_sets(files);
        if sets.len() > 1 {
            let names: Vec<String> = sets
                .iter()
                .map(|(prefix, s)| format!("{prefix} ({} files)", s.found))
                .collect();
            let first = sets.keys().next().map(String::as_str).unwrap_or("train");
            anyhow::bail!(
                "{} holds {} shard sets: {}; pass one set, e.g. --data '{}'",
                dir.display(),
                sets.len(),
                names.join(", "),
                dir.join(format!("{first}-*")).display()
            );
        }
        for (prefix, s) in &sets {
            if s.found != s.total {
                warn(format!(
                    "{}: shard set {prefix} has {} of its {} files",
                    dir.display(),
                    s.found,
                    s.total
                ));
            }
        }
        Ok(())
    })
}

/// Files of one automl shard set found in a directory.
#[derive(Debug, PartialEq)]
struct ShardSet {
    found: usize,
    /// The `-of-N` count in the names (the largest seen, should they disagree).
    total: usize,
}

/// Groups file names of the form `PREFIX-iiiii-of-nnnnn.tfrecord` by prefix; other names form
/// one set of their own (`""`), counted as complete.
fn shard_sets(files: &[PathBuf]) -> std::collections::BTreeMap<String, ShardSet> {
    let mut sets = std::collections::BTreeMap::<String, ShardSet>::new();
    for f in files {
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        let stem = name.split(".tfrecord").next().unwrap_or(&name);
        let parsed = stem.rsplit_once("-of-").and_then(|(head, total)| {
            let (prefix, index) = head.rsplit_once('-')?;
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            (digits(index) && digits(total)).then(|| (prefix.to_string(), total.parse().ok()))
        });
        let (prefix, total) = match parsed {
            Some((prefix, Some(total))) => (prefix, total),
            _ => (String::new(), 0),
        };
        let set = sets
            .entry(prefix)
            .or_insert(ShardSet { found: 0, total: 0 });
        set.found += 1;
        set.total = set.total.max(total);
    }
    if let Some(other) = sets.get_mut("") {
        other.total = other.found;
    }
    sets
}

fn expand<S: AsRef<str>>(
    inputs: &[S],
    mut check_dir: impl FnMut(&Path, &[PathBuf]) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        let input = input.as_ref();
        let p = Path::new(input);
        if p.is_dir() {
            let mut all = Vec::new();
            let mut tf = Vec::new();
            for entry in std::fs::read_dir(p)? {
                let path = entry?.path();
                if !path.is_file() {
                    continue;
                }
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                if name.contains(".tmp-") {
                    continue;
                }
                if name.contains(".tfrecord") {
                    tf.push(path.clone());
                }
                all.push(path);
            }
            let mut chosen = if tf.is_empty() { all } else { tf };
            chosen.sort();
            check_dir(p, &chosen)?;
            out.extend(chosen);
        } else if p.is_file() {
            out.push(p.to_path_buf());
        } else if input.contains(['*', '?', '[']) {
            let mut matched: Vec<PathBuf> = glob::glob(input)?
                .filter_map(Result::ok)
                .filter(|p| p.is_file())
                .collect();
            if matched.is_empty() {
                anyhow::bail!("{input}: pattern matches no file");
            }
            matched.sort();
            out.extend(matched);
        } else {
            anyhow::bail!("{input}: no such file or directory");
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn framed(payloads: &[&[u8]]) -> Vec<u8> {
        let mut buf = Vec::new();
        for p in payloads {
            write_record(&mut buf, p).unwrap();
        }
        buf
    }

    #[test]
    fn masked_crc_matches_tensorflow_constants() {
        // Value from TensorFlow's crc32c_test: masked CRC of "foo".
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let crc = crc32c::crc32c(b"foo");
        assert_eq!(
            masked_crc32c(b"foo"),
            crc.rotate_right(15).wrapping_add(MASK_DELTA)
        );
    }

    #[test]
    fn round_trip() {
        let payloads: Vec<Vec<u8>> = (0..50).map(|i| vec![i as u8; i * 37]).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
        let buf = framed(&refs);
        let reader = RecordReader::new(Cursor::new(buf), "mem");
        let got: Vec<Record> = reader.map(|r| r.unwrap()).collect();
        assert_eq!(got.len(), payloads.len());
        let mut offset = 0;
        for (i, (r, p)) in got.iter().zip(&payloads).enumerate() {
            assert_eq!(&r.payload[..], &p[..]);
            assert_eq!(r.index, i as u64);
            assert_eq!(r.offset, offset);
            offset += (p.len() + 16) as u64;
        }
    }

    #[test]
    fn flipped_payload_byte_names_offset() {
        let mut buf = framed(&[b"first", b"second", b"third"]);
        let second = 5 + 16;
        buf[second + HEADER_LEN + 2] ^= 0x40;
        let mut reader = RecordReader::new(Cursor::new(buf.clone()), "x.tfrecord");
        assert!(reader.next_record().unwrap().is_some());
        let err = reader.next_record().unwrap_err();
        assert_eq!(err.offset(), second as u64);
        assert!(matches!(err.fault(), Some(Fault::BadPayloadCrc { .. })));
        assert!(err.to_string().contains("x.tfrecord"));
        assert!(err.to_string().contains("byte offset 21"));

        let mut reader = RecordReader::new(Cursor::new(buf), "x").skip_corrupt(true);
        let got: Vec<_> = reader.by_ref().map(|r| r.unwrap().payload).collect();
        assert_eq!(
            got,
            vec![Bytes::from_static(b"first"), Bytes::from_static(b"third")]
        );
        assert_eq!(reader.skipped().len(), 1);
        assert_eq!(reader.skipped()[0].offset, second as u64);
    }

    #[test]
    fn flipped_length_byte_resyncs_when_skipping() {
        let mut buf = framed(&[b"aaaa", b"bbbbbbbb", b"cc"]);
        let second = 4 + 16;
        buf[second] ^= 0x01;
        let mut reader = RecordReader::new(Cursor::new(buf.clone()), "x");
        reader.next_record().unwrap();
        let err = reader.next_record().unwrap_err();
        assert!(matches!(err.fault(), Some(Fault::BadLengthCrc { .. })));
        assert_eq!(err.offset(), second as u64);

        let mut reader = RecordReader::new(Cursor::new(buf), "x").skip_corrupt(true);
        let got: Vec<_> = reader.by_ref().map(|r| r.unwrap().payload).collect();
        assert_eq!(
            got,
            vec![Bytes::from_static(b"aaaa"), Bytes::from_static(b"cc")]
        );
        assert_eq!(reader.skipped()[0].offset, second as u64);
    }

    #[test]
    fn truncated_tail_is_reported() {
        let buf = framed(&[b"hello", b"world!"]);
        for cut in [1, 5, 12, 15, 21] {
            let short = buf[..buf.len() - cut].to_vec();
            let mut reader = RecordReader::new(Cursor::new(short.clone()), "t");
            assert_eq!(
                &reader.next_record().unwrap().unwrap().payload[..],
                b"hello"
            );
            let err = reader.next_record().unwrap_err();
            assert_eq!(err.offset(), 21, "cut {cut}");
            assert!(
                matches!(err.fault(), Some(Fault::Truncated { .. })),
                "cut {cut}"
            );
            let mut reader = RecordReader::new(Cursor::new(short), "t").skip_corrupt(true);
            assert_eq!(reader.by_ref().filter_map(Result::ok).count(), 1);
            assert_eq!(reader.skipped().len(), 1);
        }
    }

    #[test]
    fn atomic_writer_renames_only_on_finish() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tfrecord");
        let mut w = AtomicRecordWriter::create(&path).unwrap();
        w.write(b"x").unwrap();
        assert!(!path.exists());
        drop(w);
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut w = AtomicRecordWriter::create(&path).unwrap();
        w.write(b"payload").unwrap();
        w.finish().unwrap();
        let got: Vec<_> = RecordReader::open(&path)
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(&got[0].payload[..], b"payload");
    }

    #[test]
    fn a_run_reads_one_shard_set_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let touch = |name: &str| std::fs::write(dir.path().join(name), b"").unwrap();
        for i in 0..3 {
            touch(&format!("train-{i:05}-of-00004.tfrecord"));
        }
        let d = dir.path().to_string_lossy().into_owned();
        // One set, one shard missing: the files, and a warning.
        let mut warnings = Vec::new();
        let files = expand_shard_paths(&[&d], &mut |w| warnings.push(w)).unwrap();
        assert_eq!(files.len(), 3);
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("train has 3 of its 4 files"),
            "{warnings:?}"
        );
        // The validation split converted into the same folder: refused, both sets named.
        touch("val-00000-of-00002.tfrecord");
        touch("val-00001-of-00002.tfrecord");
        let err = expand_shard_paths(&[&d], &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 shard sets"), "{err}");
        assert!(
            err.contains("train (3 files)") && err.contains("val (2 files)"),
            "{err}"
        );
        assert!(err.contains("train-*"), "{err}");
        // A glob picks one set; plain expansion (inspect) still takes everything.
        let glob = format!("{d}/val-*");
        let mut warnings = Vec::new();
        let files = expand_shard_paths(&[&glob], &mut |w| warnings.push(w)).unwrap();
        assert_eq!((files.len(), warnings.len()), (2, 0));
        assert_eq!(expand_paths(&[&d]).unwrap().len(), 5);
        // Names outside automl's pattern form one set of their own.
        let other = tempfile::tempdir().unwrap();
        for name in ["a.tfrecord", "b.tfrecord", "x-1-of-2b.tfrecord"] {
            std::fs::write(other.path().join(name), b"").unwrap();
        }
        let o = other.path().to_string_lossy().into_owned();
        assert_eq!(expand_shard_paths(&[&o], &mut |_| {}).unwrap().len(), 3);
    }
}
