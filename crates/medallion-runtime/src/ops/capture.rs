//! `medallion capture` / `medallion replay`: a topic's records (partition, offset, timestamp,
//! key, value, headers) to a file and back, byte for byte. The replay benchmark feeds the
//! pipeline through [`replay`].
//!
//! File format (all integers big-endian): the magic `MEDCAP01`, then per record
//! `partition i32, offset i64, timestamp i64 (-1: none), key, value, header count u32,
//! (header key, header value)*`, where each byte string is a length `i32` (-1: null) and its
//! bytes.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::kafka::io::{send_queued, watermarks, Stretch, StretchReader};
use crate::kafka::KafkaConnection;

use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

const MAGIC: &[u8; 8] = b"MEDCAP01";

/// One captured record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Captured {
    /// The record `message` of `partition`, with everything a replay needs.
    pub fn from_message<M: Message>(partition: i32, message: &M) -> Self {
        Captured {
            partition,
            offset: message.offset(),
            timestamp: message.timestamp().to_millis(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            headers: message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// Why a capture or replay failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Client(#[from] crate::kafka::ClientError),
    #[error(transparent)]
    Read(#[from] crate::kafka::io::ReadError),
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// What a capture or replay did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub records: u64,
    pub bytes: u64,
    pub errors: u64,
    pub seconds: f64,
}

impl Summary {
    pub fn per_second(&self) -> (f64, f64) {
        let s = self.seconds.max(1e-9);
        (self.records as f64 / s, self.bytes as f64 / s)
    }

    /// A two-line table.
    pub fn table(&self) -> String {
        let (rps, bps) = self.per_second();
        format!(
            "{:>10} {:>14} {:>9} {:>12} {:>12} {:>7}\n{:>10} {:>14} {:>9.2} {:>12.0} {:>12.0} {:>7}",
            "records", "bytes", "seconds", "records/s", "bytes/s", "errors",
            self.records, self.bytes, self.seconds, rps, bps, self.errors
        )
    }
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> CaptureError {
    CaptureError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn write_bytes(w: &mut impl Write, bytes: Option<&[u8]>) -> std::io::Result<()> {
    match bytes {
        None => w.write_all(&(-1i32).to_be_bytes()),
        Some(b) => {
            w.write_all(&(b.len() as i32).to_be_bytes())?;
            w.write_all(b)
        }
    }
}

fn read_exact<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn read_bytes(r: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let len = i32::from_be_bytes(read_exact::<4>(r)?);
    if len < 0 {
        return Ok(None);
    }
    // Read what is there rather than allocating what the length claims: a corrupt length
    // becomes a truncation error, not a multi-gigabyte allocation.
    let mut buf = Vec::new();
    r.by_ref().take(len as u64).read_to_end(&mut buf)?;
    if buf.len() != len as usize {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("a field claims {len} bytes but only {} remain", buf.len()),
        ));
    }
    Ok(Some(buf))
}

/// Appends records to a capture file.
pub struct CaptureWriter<W: Write> {
    out: W,
}

impl<W: Write> CaptureWriter<W> {
    pub fn new(mut out: W) -> std::io::Result<Self> {
        out.write_all(MAGIC)?;
        Ok(Self { out })
    }

    pub fn write(&mut self, r: &Captured) -> std::io::Result<()> {
        let w = &mut self.out;
        w.write_all(&r.partition.to_be_bytes())?;
        w.write_all(&r.offset.to_be_bytes())?;
        w.write_all(&r.timestamp.unwrap_or(-1).to_be_bytes())?;
        write_bytes(w, r.key.as_deref())?;
        write_bytes(w, r.value.as_deref())?;
        w.write_all(&(r.headers.len() as u32).to_be_bytes())?;
        for (k, v) in &r.headers {
            write_bytes(w, Some(k.as_bytes()))?;
            write_bytes(w, v.as_deref())?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads the records of a capture file, in order.
pub fn read_capture(path: &Path) -> Result<Vec<Captured>, CaptureError> {
    let file = std::fs::File::open(path).map_err(|e| file_error(path, e))?;
    let mut r = BufReader::new(file);
    let magic = read_exact::<8>(&mut r).map_err(|e| file_error(path, e))?;
    if &magic != MAGIC {
        return Err(file_error(path, "not a medallion capture file"));
    }
    let mut out = Vec::new();
    loop {
        let partition = match read_exact::<4>(&mut r) {
            Ok(b) => i32::from_be_bytes(b),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(out),
            Err(e) => return Err(file_error(path, e)),
        };
        let record = (|| -> std::io::Result<Captured> {
            let offset = i64::from_be_bytes(read_exact::<8>(&mut r)?);
            let timestamp = i64::from_be_bytes(read_exact::<8>(&mut r)?);
            let key = read_bytes(&mut r)?;
            let value = read_bytes(&mut r)?;
            let count = u32::from_be_bytes(read_exact::<4>(&mut r)?);
            // Grows as headers are read: a corrupt count cannot reserve memory up front.
            let mut headers = Vec::with_capacity((count as usize).min(64));
            for _ in 0..count {
                let k = read_bytes(&mut r)?.unwrap_or_default();
                headers.push((
                    String::from_utf8_lossy(&k).into_owned(),
                    read_bytes(&mut r)?,
                ));
            }
            Ok(Captured {
                partition,
                offset,
                timestamp: (timestamp >= 0).then_some(timestamp),
                key,
                value,
                headers,
            })
        })()
        .map_err(|e| {
            file_error(
                path,
                format!("truncated record after {} records: {e}", out.len()),
            )
        })?;
        out.push(record);
    }
}

/// Every record of `topic` present now, partition by partition (read to each partition's end).
pub fn read_topic_now(
    kafka: &KafkaConnection,
    topic: &str,
    mut each: impl FnMut(Captured) -> Result<(), CaptureError>,
) -> Result<(), CaptureError> {
    for partition in watermarks(kafka, topic)?.into_keys() {
        let mut reader = StretchReader::open(
            kafka,
            topic,
            &[Stretch::whole(partition)],
            "capture reader",
            Duration::from_secs(600),
        )?;
        while let Some(message) = reader.next_record() {
            each(Captured::from_message(partition, &message?))?;
        }
    }
    Ok(())
}

/// Captures `topic` as it is now into `path`.
pub fn capture(
    kafka: &KafkaConnection,
    topic: &str,
    path: &Path,
    progress: impl Fn(&Summary),
) -> Result<Summary, CaptureError> {
    let started = Instant::now();
    let file = std::fs::File::create(path).map_err(|e| file_error(path, e))?;
    let mut writer = CaptureWriter::new(BufWriter::new(file)).map_err(|e| file_error(path, e))?;
    let mut summary = Summary::default();
    read_topic_now(kafka, topic, |record| {
        summary.records += 1;
        summary.bytes += record.value.as_ref().map_or(0, Vec::len) as u64;
        writer.write(&record).map_err(|e| file_error(path, e))?;
        if summary.records % 10_000 == 0 {
            summary.seconds = started.elapsed().as_secs_f64();
            progress(&summary);
        }
        Ok(())
    })?;
    writer.finish().map_err(|e| file_error(path, e))?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// How a replay places and paces records.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Records per second; `None`: as fast as the broker takes them.
    pub rate: Option<f64>,
    /// Keep each record's partition (the default); otherwise partition by key.
    pub by_key: bool,
    /// Keep the captured timestamps (the default); otherwise the broker stamps them.
    pub new_timestamps: bool,
}

/// Produces `records` into `topic`; `progress` is called now and then with (done, total).
pub async fn replay(
    kafka: &KafkaConnection,
    topic: &str,
    records: &[Captured],
    options: &ReplayOptions,
    progress: impl Fn(&Summary, usize),
) -> Result<Summary, CaptureError> {
    let producer: FutureProducer = crate::kafka::producer(kafka)?;
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut pending = Vec::new();
    let mut last_report = Instant::now();
    for (i, r) in records.iter().enumerate() {
        if let Some(rate) = options.rate.filter(|r| *r > 0.0) {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(key) = &r.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &r.value {
            record = record.payload(value.as_slice());
        }
        if !options.by_key {
            record = record.partition(r.partition);
        }
        if let (Some(ts), false) = (r.timestamp, options.new_timestamps) {
            record = record.timestamp(ts);
        }
        pending.push(send_queued(&producer, record).await?);
        summary.bytes += r.value.as_ref().map_or(0, Vec::len) as u64;
        if pending.len() >= 10_000 {
            settle(&mut pending, &mut summary).await;
        }
        if last_report.elapsed() > Duration::from_millis(200) {
            last_report = Instant::now();
            summary.seconds = started.elapsed().as_secs_f64();
            progress(&summary, records.len());
        }
    }
    settle(&mut pending, &mut summary).await;
    summary.seconds = started.elapsed().as_secs_f64();
    progress(&summary, records.len());
    Ok(summary)
}

async fn settle(pending: &mut Vec<rdkafka::producer::DeliveryFuture>, summary: &mut Summary) {
    for delivery in pending.drain(..) {
        match delivery.await {
            Ok(Ok(_)) => summary.records += 1,
            _ => summary.errors += 1,
        }
    }
}

/// `[#####.....]  45%  12345/27000  8123 records/s`, for a terminal line.
pub fn progress_line(summary: &Summary, total: usize) -> String {
    let done = (summary.records + summary.errors) as usize;
    let share = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let filled = (share * 30.0).round() as usize;
    format!(
        "[{}{}] {:>3.0}%  {done}/{total}  {:.0} records/s",
        "#".repeat(filled.min(30)),
        ".".repeat(30 - filled.min(30)),
        share * 100.0,
        summary.per_second().0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_round_trip_through_the_file_format() {
        let records = vec![
            Captured {
                partition: 2,
                offset: 7,
                timestamp: Some(1_700_000_000_000),
                key: Some(b"42".to_vec()),
                value: Some(vec![0, 0, 0, 0, 1, 9]),
                headers: vec![("a".into(), Some(b"x".to_vec())), ("b".into(), None)],
            },
            Captured {
                partition: 0,
                offset: 0,
                timestamp: None,
                key: None,
                value: None,
                headers: vec![],
            },
        ];
        let path = std::env::temp_dir().join(format!("capture-{}.bin", uuid::Uuid::new_v4()));
        let mut w = CaptureWriter::new(std::fs::File::create(&path).expect("file")).expect("w");
        for r in &records {
            w.write(r).expect("write");
        }
        w.finish().expect("flush");
        assert_eq!(read_capture(&path).expect("read"), records);
        // A truncated file is an error that says where, not a short read.
        let bytes = std::fs::read(&path).expect("bytes");
        std::fs::write(&path, &bytes[..bytes.len() - 3]).expect("truncate");
        let e = read_capture(&path).expect_err("truncated").to_string();
        assert!(e.contains("truncated record after 1 records"), "{e}");
        std::fs::write(&path, b"nope").expect("garbage");
        assert!(read_capture(&path).is_err());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn corrupt_lengths_are_errors_not_allocations() {
        let path = std::env::temp_dir().join(format!("capture-{}.bin", uuid::Uuid::new_v4()));
        let header = |tail: &[u8]| {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&0i32.to_be_bytes()); // partition
            b.extend_from_slice(&0i64.to_be_bytes()); // offset
            b.extend_from_slice(&(-1i64).to_be_bytes()); // timestamp
            b.extend_from_slice(tail);
            b
        };
        // A key that claims 2 GiB with 3 bytes behind it.
        let mut tail = i32::MAX.to_be_bytes().to_vec();
        tail.extend_from_slice(b"abc");
        std::fs::write(&path, header(&tail)).expect("write");
        let e = read_capture(&path).expect_err("corrupt length").to_string();
        assert!(
            e.contains("claims 2147483647 bytes but only 3 remain"),
            "{e}"
        );
        // A header count of four billion with no headers behind it.
        let mut tail = (-1i32).to_be_bytes().to_vec(); // no key
        tail.extend_from_slice(&(-1i32).to_be_bytes()); // no value
        tail.extend_from_slice(&u32::MAX.to_be_bytes());
        std::fs::write(&path, header(&tail)).expect("write");
        let e = read_capture(&path).expect_err("corrupt count").to_string();
        assert!(e.contains("truncated record after 0 records"), "{e}");
        assert!(read_capture(&path).is_err());
        let _ = std::fs::remove_file(&path);
    }
}
