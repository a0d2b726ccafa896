use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn options(dir: &Path, identity: &str) -> StoreOptions {
    StoreOptions {
        dir: dir.join("state"),
        identity: identity.to_string(),
        cache_bytes: 4 << 20,
        write_buffer_bytes: 8 << 20,
    }
}

fn contents(table: &Table) -> BTreeMap<Vec<u8>, Vec<u8>> {
    table.prefix(b"").map(|kv| kv.expect("readable")).collect()
}

#[test]
fn what_was_put_is_read_back_after_a_reopen_with_its_checkpoint() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let store = StateStore::open(options(dir.path(), "silver")).expect("opens");
        assert_eq!(store.found(), Found::New);
        let t = store.table("merge", 3).expect("table");
        assert_eq!(t.checkpoint(), None, "a new table has no checkpoint");
        t.put(b"7/lead/a", b"1").expect("put");
        t.put(b"7/lead/b", b"2").expect("put");
        t.put(b"8/lead/a", b"3").expect("put");
        t.apply([
            (b"7/lead/b".to_vec(), Some(b"22".to_vec())),
            (b"8/lead/a".to_vec(), None),
        ])
        .expect("applied");
        t.write_checkpoint(41).expect("checkpoint");
        // Another partition's table is its own.
        let other = store.table("merge", 4).expect("table");
        other.put(b"7/lead/a", b"elsewhere").expect("put");
        assert_eq!(other.checkpoint(), None);
    }
    let store = StateStore::open(options(dir.path(), "silver")).expect("reopens");
    assert_eq!(store.found(), Found::Reopened);
    let t = store.table("merge", 3).expect("table");
    assert_eq!(t.checkpoint(), Some(41));
    assert_eq!(t.get(b"7/lead/a").expect("get"), Some(b"1".to_vec()));
    assert_eq!(t.get(b"8/lead/a").expect("get"), None, "deleted");
    let org7: Vec<_> = t.prefix(b"7/").map(|kv| kv.expect("kv").0).collect();
    assert_eq!(org7, [b"7/lead/a".to_vec(), b"7/lead/b".to_vec()]);
    assert_eq!(t.count().expect("count"), 2);
    assert_eq!(
        store
            .table("merge", 4)
            .expect("table")
            .get(b"7/lead/a")
            .expect("get"),
        Some(b"elsewhere".to_vec())
    );
}

#[test]
fn a_forgotten_damaged_or_borrowed_checkpoint_reads_as_none() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = StateStore::open(options(dir.path(), "silver")).expect("opens");
    let t = store.table("merge", 0).expect("table");
    t.put(b"k", b"v").expect("put");
    t.write_checkpoint(10).expect("checkpoint");
    assert_eq!(t.checkpoint(), Some(10));
    t.forget_checkpoint().expect("forgotten");
    assert_eq!(
        t.checkpoint(),
        None,
        "writes ahead of the changelog: rebuild"
    );
    t.forget_checkpoint().expect("forgetting twice is fine");

    t.write_checkpoint(10).expect("checkpoint");
    let path = dir.path().join("state").join(CHECKPOINTS).join("merge_0");
    let text = std::fs::read_to_string(&path).expect("checkpoint file");
    std::fs::write(&path, text.replace("\n10\n", "\n99\n")).expect("tampered");
    assert_eq!(t.checkpoint(), None, "the digest no longer matches");
    std::fs::write(&path, &text[..text.len() / 2]).expect("truncated");
    assert_eq!(t.checkpoint(), None, "a torn file");

    // Table 1's checkpoint copied over table 0's: not table 0's.
    let t1 = store.table("merge", 1).expect("table");
    t1.write_checkpoint(5).expect("checkpoint");
    std::fs::copy(
        dir.path().join("state").join(CHECKPOINTS).join("merge_1"),
        &path,
    )
    .expect("copied");
    assert_eq!(t.checkpoint(), None);
}

#[test]
fn another_owners_store_is_discarded_and_so_is_one_that_will_not_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let store = StateStore::open(options(dir.path(), "silver")).expect("opens");
        let t = store.table("merge", 0).expect("table");
        t.put(b"k", b"v").expect("put");
        t.write_checkpoint(3).expect("checkpoint");
    }
    {
        let store = StateStore::open(options(dir.path(), "another-group")).expect("opens");
        assert_eq!(store.found(), Found::Discarded);
        let t = store.table("merge", 0).expect("table");
        assert_eq!(t.checkpoint(), None);
        assert_eq!(
            t.get(b"k").expect("get"),
            None,
            "nothing of the other owner's"
        );
        t.put(b"k", b"mine").expect("put");
        t.write_checkpoint(1).expect("checkpoint");
    }
    // Damage every file of the engine's.
    let state = dir.path().join("state");
    let mut damaged = 0;
    for entry in walk(&state) {
        if entry.to_string_lossy().contains(CHECKPOINTS) || entry.ends_with(IDENTITY) {
            continue;
        }
        std::fs::write(&entry, b"\xffnot what was written").expect("damaged");
        damaged += 1;
    }
    assert!(damaged > 0, "the engine wrote files");
    let store = StateStore::open(options(dir.path(), "another-group")).expect("opens anyway");
    assert_eq!(store.found(), Found::Discarded);
    let t = store.table("merge", 0).expect("table");
    assert_eq!(t.checkpoint(), None, "a rebuilt store has no checkpoint");
    assert_eq!(t.count().expect("count"), 0);

    // A store of the earlier layout (one tree per table; its identity names no layout) is
    // not read as this one.
    drop((t, store));
    std::fs::write(state.join(IDENTITY), "another-group").expect("identity of old");
    let store = StateStore::open(options(dir.path(), "another-group")).expect("opens");
    assert_eq!(store.found(), Found::Discarded);
    let t = store.table("merge", 0).expect("table");

    // Nor one of the leveled layout before it: its trees keep the compaction they were
    // created with, so it is rebuilt.
    drop((t, store));
    std::fs::write(
        state.join(IDENTITY),
        "another-group\nlayout 2 (tables of a state share a tree, prefixed by partition)",
    )
    .expect("identity of layout 2");
    let store = StateStore::open(options(dir.path(), "another-group")).expect("opens");
    assert_eq!(store.found(), Found::Discarded);
    let t = store.table("merge", 0).expect("table");

    // A directory with files but no identity is not trusted either.
    drop((t, store));
    std::fs::remove_file(state.join(IDENTITY)).expect("identity removed");
    let store = StateStore::open(options(dir.path(), "another-group")).expect("opens");
    assert_eq!(store.found(), Found::Discarded);
}

#[test]
fn one_process_at_a_time_opens_a_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = StateStore::open(options(dir.path(), "silver")).expect("opens");
    let second = StateStore::open(options(dir.path(), "silver"));
    let Err(StoreError::InUse { dir: named }) = second else {
        panic!("a second opener is refused");
    };
    assert!(named.ends_with("state"), "{named}");
    assert!(StoreError::InUse { dir: named }
        .to_string()
        .contains("needs a state.dir of its own"));
    drop(first);
    StateStore::open(options(dir.path(), "silver")).expect("free again once closed");
}

#[test]
fn clear_empties_the_table_and_forgets_its_checkpoint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = StateStore::open(options(dir.path(), "silver")).expect("opens");
    let t = store.table("owners", 2).expect("table");
    // The partitions either side share the engine tree, under their own prefixes.
    let before = store.table("owners", 1).expect("table");
    let after = store.table("owners", 3).expect("table");
    for i in 0..1000u32 {
        t.put(&i.to_be_bytes(), b"x").expect("put");
        before.put(&i.to_be_bytes(), b"b").expect("put");
        after.put(&i.to_be_bytes(), b"a").expect("put");
    }
    t.write_checkpoint(1000).expect("checkpoint");
    before.write_checkpoint(7).expect("checkpoint");
    t.clear().expect("cleared");
    assert_eq!(t.count().expect("count"), 0);
    assert_eq!(t.checkpoint(), None);
    assert_eq!(
        before.count().expect("count"),
        1000,
        "a neighbour keeps its keys"
    );
    assert_eq!(after.count().expect("count"), 1000);
    assert_eq!(before.checkpoint(), Some(7), "and its checkpoint");
    assert_eq!(
        after.get(&5u32.to_be_bytes()).expect("get"),
        Some(b"a".to_vec())
    );
    t.put(b"after", b"1").expect("usable after clearing");
    assert_eq!(t.get(b"after").expect("get"), Some(b"1".to_vec()));
}

#[test]
fn a_global_table_keeps_one_checkpoint_per_source_partition() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let store = StateStore::open(options(dir.path(), "silver")).expect("opens");
        let t = store.global_table("entity-owners").expect("table");
        t.put(b"case/C-1", b"7|e1").expect("put");
        t.write_source_checkpoint(0, 12).expect("checkpoint 0");
        t.write_source_checkpoint(3, 40).expect("checkpoint 3");
        // A per-partition table of the same name is another table with other checkpoints.
        let p0 = store.table("entity-owners", 0).expect("table");
        assert_eq!(p0.checkpoint(), None);
        assert_eq!(p0.get(b"case/C-1").expect("get"), None);
    }
    let store = StateStore::open(options(dir.path(), "silver")).expect("reopens");
    let t = store.global_table("entity-owners").expect("table");
    assert_eq!(t.source_checkpoint(0), Some(12));
    assert_eq!(t.source_checkpoint(3), Some(40));
    assert_eq!(t.source_checkpoint(1), None);
    assert_eq!(t.get(b"case/C-1").expect("get"), Some(b"7|e1".to_vec()));
    // A source checkpoint copied onto another source does not vouch for it.
    let checkpoints = dir.path().join("state").join("checkpoints");
    std::fs::copy(
        checkpoints.join("entity-owners_all@0"),
        checkpoints.join("entity-owners_all@1"),
    )
    .expect("copied");
    assert_eq!(t.source_checkpoint(1), None);
    t.clear().expect("cleared");
    assert_eq!(t.source_checkpoint(0), None);
    assert_eq!(t.source_checkpoint(3), None);
    assert_eq!(t.get(b"case/C-1").expect("get"), None);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("readable").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u8),
    Delete(u8),
    Apply(Vec<(u8, Option<u8>)>),
    Checkpoint(u16),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u8>(), any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
        2 => any::<u8>().prop_map(Op::Delete),
        2 => proptest::collection::vec((any::<u8>(), proptest::option::of(any::<u8>())), 0..8)
            .prop_map(Op::Apply),
        1 => any::<u16>().prop_map(Op::Checkpoint),
        1 => Just(Op::Reopen),
    ]
}

fn table_of(store: &StateStore, partition: i32) -> Table {
    store.table("t", partition).expect("table")
}

fn key(k: u8) -> Vec<u8> {
    // Two prefixes, so prefix scans have something to tell apart.
    format!("{}/{k:03}", k % 2).into_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Against a map: every read after any sequence of writes, checkpoints and reopens gives
    /// what the map holds, and the checkpoint read back is the last one written.
    #[test]
    fn the_table_behaves_as_a_map_across_reopens(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut checkpoint = None;
        let mut store = StateStore::open(options(dir.path(), "p")).expect("opens");
        let mut table = store.table("t", 0).expect("table");
        // The next partition's table of the same state: untouched by anything done to table 0.
        let neighbour: BTreeMap<Vec<u8>, Vec<u8>> =
            (0..=255u8).step_by(3).map(|k| (key(k), b"n".to_vec())).collect();
        table_of(&store, 1).apply(neighbour.iter().map(|(k, v)| (k.clone(), Some(v.clone())))).expect("applied");
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    table.put(&key(k), &[v]).expect("put");
                    model.insert(key(k), vec![v]);
                }
                Op::Delete(k) => {
                    table.delete(&key(k)).expect("delete");
                    model.remove(&key(k));
                }
                Op::Apply(changes) => {
                    let changes: Vec<Change> =
                        changes.into_iter().map(|(k, v)| (key(k), v.map(|v| vec![v]))).collect();
                    for (k, v) in &changes {
                        match v {
                            Some(v) => model.insert(k.clone(), v.clone()),
                            None => model.remove(k),
                        };
                    }
                    table.apply(changes).expect("applied");
                }
                Op::Checkpoint(o) => {
                    table.write_checkpoint(i64::from(o)).expect("checkpoint");
                    checkpoint = Some(i64::from(o));
                }
                Op::Reopen => {
                    drop(table);
                    drop(store);
                    store = StateStore::open(options(dir.path(), "p")).expect("reopens");
                    prop_assert_eq!(store.found(), Found::Reopened);
                    table = store.table("t", 0).expect("table");
                }
            }
            prop_assert_eq!(table.checkpoint(), checkpoint);
        }
        prop_assert_eq!(contents(&table), model.clone());
        let odd: BTreeMap<_, _> = table.prefix(b"1/").map(|kv| kv.expect("kv")).collect();
        let model_odd: BTreeMap<_, _> =
            model.iter().filter(|(k, _)| k.starts_with(b"1/")).map(|(k, v)| (k.clone(), v.clone())).collect();
        prop_assert_eq!(odd, model_odd);
        prop_assert_eq!(contents(&table_of(&store, 1)), neighbour);
    }
}
