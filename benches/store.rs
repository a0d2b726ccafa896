//! The local state store (`medallion-store`, fjall) on silver's shapes of key and
//! value: entity keys `<org>/<type>/<id>`, merge-state values of ~70 bytes. Per iteration, a
//! fresh store of 200,000 keys:
//!
//! - **restore**: changelog entries applied in chunks of 10,000, then the checkpoint (the
//!   rebuild of a table on an empty disk; goal ≥ 300k entries/s);
//! - **new entities**: a lookup that misses, then a write, in batches of 2,000 (silver on
//!   events that are all new entities);
//! - **lookups**: reads of keys that are there, in random order.
//!
//! `cargo bench -p medallion-benches --bench store`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use medallion_store::{Change, StateStore, StoreOptions, Table};

const KEYS: u64 = 200_000;

fn key(i: u64) -> Vec<u8> {
    format!(
        "{}/lead/LEAD-{:016x}",
        i % 5_000,
        i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    )
    .into_bytes()
}

fn value(i: u64) -> Vec<u8> {
    format!(
        "v2|{}|CREATED|{:032x}||crm-{}",
        1_700_000_000_000u64 + i,
        i,
        i % 7
    )
    .into_bytes()
}

fn fresh() -> (tempfile::TempDir, StateStore, Table) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = StateStore::open(StoreOptions {
        dir: dir.path().join("state"),
        identity: "bench".into(),
        cache_bytes: 32 << 20,
        write_buffer_bytes: 64 << 20,
    })
    .expect("store");
    let table = store.table("merge", 0).expect("table");
    (dir, store, table)
}

fn restore(table: &Table) {
    let mut chunk: Vec<Change> = Vec::with_capacity(10_000);
    for i in 0..KEYS {
        chunk.push((key(i), Some(value(i))));
        if chunk.len() == 10_000 {
            table.apply(std::mem::take(&mut chunk)).expect("applied");
        }
    }
    table.apply(chunk).expect("applied");
    table.write_checkpoint(KEYS as i64).expect("checkpoint");
}

fn store(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    group.sample_size(10);
    group.throughput(Throughput::Elements(KEYS));
    group.bench_function("restore", |b| {
        b.iter_batched(fresh, |(_d, _s, t)| restore(&t), BatchSize::PerIteration)
    });
    group.bench_function("new_entities", |b| {
        b.iter_batched(
            fresh,
            |(_d, _s, t)| {
                let mut batch: Vec<Change> = Vec::with_capacity(2_000);
                for i in 0..KEYS {
                    let k = key(i);
                    assert!(t.get(&k).expect("get").is_none());
                    batch.push((k, Some(value(i))));
                    if batch.len() == 2_000 {
                        t.apply(std::mem::take(&mut batch)).expect("applied");
                    }
                }
                t.apply(batch).expect("applied");
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("lookups", |b| {
        b.iter_batched(
            || {
                let f = fresh();
                restore(&f.2);
                f
            },
            |(_d, _s, t)| {
                for i in 0..KEYS {
                    let k = key(i.wrapping_mul(7_919) % KEYS);
                    assert!(t.get(&k).expect("get").is_some());
                }
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
