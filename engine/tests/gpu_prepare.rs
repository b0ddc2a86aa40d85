//! scripts/gpu-prepare.sh's size check: the bundle must stay under 60 MB because the GPU machine
//! takes at most 64 MB per call, repository included.

use std::path::Path;
use std::process::Command;

fn check_size(dir: &Path) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gpu-prepare.sh");
    Command::new("bash").arg(script).arg("--check-size").arg(dir).output().expect("bash runs")
}

/// A folder holding files of these sizes (sparse: the check counts apparent sizes).
fn bundle(sizes: &[u64]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("bin")).unwrap();
    for (i, &n) in sizes.iter().enumerate() {
        std::fs::File::create(dir.path().join("bin").join(format!("f{i}"))).unwrap().set_len(n).unwrap();
    }
    dir
}

#[test]
fn a_bundle_under_60_mb_passes_and_one_over_fails_naming_the_biggest_file() {
    let small = bundle(&[30_000_000, 20_000_000]);
    let out = check_size(small.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let big = bundle(&[45_000_000, 15_000_000]);
    let out = check_size(big.path());
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("over the limit of 60000000") && e.contains("f0"), "{e}");
}

#[test]
fn the_size_check_needs_a_folder() {
    let out = check_size(Path::new("/no/such/bundle"));
    assert_eq!(out.status.code(), Some(2));
}
