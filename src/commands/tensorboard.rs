//! TensorBoard scalar logging: `events.out.tfevents.<time>.<host>.<pid>.<n>` files made of TFRecord-framed
//! `tensorflow.Event` protos (only the fields scalars need), written with our own prost types.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;

/// `tensorflow.Event` (subset).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` (scalar form).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, tag = "2")]
    pub simple_value: f32,
}

/// Appends scalar events to one events file.
pub struct EventWriter {
    out: BufWriter<File>,
    pub path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<unix time>.<host>.<pid>.<n>` (pid and a per-process
    /// counter keep a training run and an `eval` of it from sharing a name within one second)
    /// and writes the version event.
    pub fn create(dir: &Path) -> anyhow::Result<EventWriter> {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "localhost".into());
        static CREATED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = CREATED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}.{n}",
            now() as u64,
            std::process::id()
        ));
        let file =
            File::create(&path).map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
        let mut w = EventWriter {
            out: BufWriter::new(file),
            path,
        };
        w.write(&Event {
            wall_time: now(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        Ok(w)
    }

    fn write(&mut self, e: &Event) -> anyhow::Result<()> {
        effdet_pipeline::tfrecord::write_record(&mut self.out, &e.encode_to_vec())?;
        Ok(())
    }

    /// One event holding all `scalars` at `step`.
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> anyhow::Result<()> {
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary {
                value: scalars
                    .iter()
                    .map(|(t, v)| SummaryValue {
                        tag: t.to_string(),
                        simple_value: *v as f32,
                    })
                    .collect(),
            }),
        })
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_back() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut w = EventWriter::create(dir.path())?;
        w.scalars(3, &[("loss", 1.5), ("lr", 0.25)])?;
        w.flush()?;
        let path = w.path.clone();
        drop(w);
        let recs: Vec<Vec<u8>> = effdet_pipeline::tfrecord::RecordReader::open(&path)?
            .map(|r| r.map(|r| r.payload.to_vec()))
            .collect::<Result<_, _>>()?;
        assert_eq!(recs.len(), 2);
        let first = Event::decode(&recs[0][..])?;
        assert_eq!(first.file_version.as_deref(), Some("brain.Event:2"));
        let e = Event::decode(&recs[1][..])?;
        assert_eq!(e.step, 3);
        let v = e.summary.unwrap().value;
        assert_eq!(v[0].tag, "loss");
        assert_eq!(v[0].simple_value, 1.5);
        assert_eq!(v[1].tag, "lr");
        assert_eq!(v[1].simple_value, 0.25);
        Ok(())
    }
}
