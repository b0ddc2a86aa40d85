//! A model folder is read once per process: however many ranks load their slices of it,
//! config.json and every weights shard are opened once (the kernel's inotify counts the opens).
#![cfg(target_os = "linux")]

mod common;
#[path = "common/shards.rs"]
mod shards;

use std::collections::BTreeMap;

use arbiter_engine::parallel::Parallelism;
use arbiter_engine::runtime::{LoadOptions, LoadedModel};
use arbiter_engine::PackedBatch;
use inotify::{Inotify, WatchMask};

/// Opens of each file in the watched folder since the watch began.
fn opens(inotify: &mut Inotify) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    let mut buf = [0u8; 1 << 16];
    loop {
        match inotify.read_events(&mut buf) {
            Ok(events) => {
                let mut any = false;
                for e in events {
                    any = true;
                    if let Some(name) = e.name {
                        *counts.entry(name.to_string_lossy().into_owned()).or_default() += 1;
                    }
                }
                if !any {
                    return counts;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return counts,
            Err(e) => panic!("reading inotify events: {e}"),
        }
    }
}

#[test]
fn a_split_model_opens_its_config_and_each_shard_once() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(common::fixture("nemotron-v5").join(file), dir.path().join(file)).unwrap();
    }
    let shards = shards::split_into_two_shards(dir.path());
    let mut inotify = Inotify::init().unwrap();
    inotify.watches().add(dir.path(), WatchMask::OPEN).unwrap();

    // Four ranks (TP=2 x PP=2), each reading its own slices.
    let opts = LoadOptions { threads: 4, parallel: Parallelism { tp: 2, pp: 2 }, ..LoadOptions::default() };
    let model = LoadedModel::load(dir.path(), &opts).unwrap();
    let counts = opens(&mut inotify);

    assert_eq!(counts.get("config.json"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("model.safetensors.index.json"), Some(&1), "{counts:?}");
    for shard in &shards {
        assert_eq!(counts.get(shard.as_str()), Some(&1), "{shard}: {counts:?}");
    }
    // And the ranks really did load from that one mapping.
    let raw = model.engine.forward(&PackedBatch::from_sequences(&[vec![1u32, 2, 3]]).unwrap()).unwrap();
    assert_eq!(raw.len(), 1);
    assert!(raw[0].iter().all(|v| v.is_finite()));
}
