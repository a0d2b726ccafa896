//! Decoding Confluent-framed envelope records into Arrow (target: ≥ 2M records/s/core in
//! release builds), and encoding them back.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use medallion_benches::{connector_contract, contract, framed_events};
use medallion_contracts::columnar::{BatchDecoder, BatchEncoder};
use medallion_contracts::Contract;

const RECORDS: usize = 1_000_000;
const BATCH: usize = 4_096;

/// A decoder of `contract` that knows it as writer schema id 1.
fn decoder_for(contract: &Contract) -> BatchDecoder {
    let mut decoder = match BatchDecoder::new(&contract.full_name, &contract.text) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    if let Err(e) = decoder.add_writer_schema(1, &contract.text) {
        panic!("{e}");
    }
    decoder
}

/// Decodes every message in batches of `BATCH`; returns the row count.
fn decode_all(decoder: &mut BatchDecoder, messages: &[Vec<u8>]) -> usize {
    let mut rows = 0;
    for chunk in messages.chunks(BATCH) {
        match decoder.decode(chunk.iter().map(Vec::as_slice)) {
            Ok(d) => rows += d.batch.num_rows(),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(rows, RECORDS);
    rows
}

/// The envelope alone (`common/metadata.avsc`): the target's "envelope records".
fn decode_envelopes(c: &mut Criterion) {
    let contract = contract("common/metadata.avsc");
    let messages = framed_events(&contract, 1, RECORDS, 20_000);
    let bytes: usize = messages.iter().map(Vec::len).sum();
    let mut group = c.benchmark_group("confluent_avro_to_arrow");
    group.sample_size(10);
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.bench_function(
        format!("decode_1m_envelope_only_{}B_avg", bytes / RECORDS),
        |b| {
            b.iter_batched(
                || decoder_for(&contract),
                |mut decoder| decode_all(&mut decoder, &messages),
                BatchSize::PerIteration,
            )
        },
    );
    group.finish();
}

fn decode(c: &mut Criterion) {
    let contract = connector_contract();
    let messages = framed_events(&contract, 1, RECORDS, 20_000);
    let bytes: usize = messages.iter().map(Vec::len).sum();
    let mut group = c.benchmark_group("confluent_avro_to_arrow");
    group.sample_size(10);
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.bench_function(
        format!("decode_1m_envelopes_{}B_avg", bytes / RECORDS),
        |b| {
            b.iter_batched(
                || decoder_for(&contract),
                |mut decoder| decode_all(&mut decoder, &messages),
                BatchSize::PerIteration,
            )
        },
    );
    // The two halves of decoding, to see where the time goes.
    group.bench_function("check_only", |b| {
        let decoder = decoder_for(&contract);
        b.iter(|| messages.iter().filter(|m| decoder.check(m).is_ok()).count())
    });
    for with_reader in [false, true] {
        group.bench_function(
            format!("arrow_avro_only_reader_schema_{with_reader}"),
            |b| {
                b.iter(|| {
                    use arrow_avro::reader::ReaderBuilder;
                    use arrow_avro::schema::{
                        AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore,
                    };
                    let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
                    let schema = AvroSchema::new(contract.text.clone());
                    if let Err(e) = store.set(Fingerprint::Id(1), schema.clone()) {
                        panic!("{e}");
                    }
                    let mut builder = ReaderBuilder::new()
                        .with_batch_size(BATCH)
                        .with_writer_schema_store(store);
                    if with_reader {
                        builder = builder.with_reader_schema(schema);
                    }
                    let mut decoder = match builder.build_decoder() {
                        Ok(d) => d,
                        Err(e) => panic!("{e}"),
                    };
                    let mut rows = 0;
                    for chunk in messages.chunks(BATCH) {
                        for m in chunk {
                            if let Err(e) = decoder.decode(m) {
                                panic!("{e}");
                            }
                        }
                        match decoder.flush() {
                            Ok(Some(b)) => rows += b.num_rows(),
                            Ok(None) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                    assert_eq!(rows, RECORDS);
                    rows
                })
            },
        );
    }
    group.finish();

    let mut decoder = decoder_for(&contract);
    let batches: Vec<_> = messages
        .chunks(BATCH)
        .map(
            |chunk| match decoder.decode(chunk.iter().map(Vec::as_slice)) {
                Ok(d) => d.batch,
                Err(e) => panic!("{e}"),
            },
        )
        .collect();
    let mut group = c.benchmark_group("arrow_to_confluent_avro");
    group.sample_size(10);
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.bench_function("encode_1m_envelopes", |b| {
        b.iter(|| {
            let mut encoder = match BatchEncoder::new(&batches[0].schema(), &contract.text, 1) {
                Ok(e) => e,
                Err(e) => panic!("{e}"),
            };
            let mut n = 0;
            for batch in &batches {
                match encoder.encode(batch) {
                    Ok(rows) => n += rows.len(),
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(n, RECORDS);
            n
        })
    });
    group.finish();
}

criterion_group!(benches, decode_envelopes, decode);
criterion_main!(benches);
