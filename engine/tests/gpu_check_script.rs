//! scripts/gpu-check.sh's contract with the GPU machine, which returns at most 8 files from
//! `$OUT`: it leaves `gpu-check.md` and one archive of everything else there, also when steps
//! fail, and runs python3 with the `LD_LIBRARY_PATH` it was given (not the one with the CUDA
//! library folders it builds for the Rust binaries, which can give torch a mismatched cuBLAS).
//! The bundle's binaries and gpu_hf.py are replaced by small scripts that record what they see.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn write_executable(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A bundle whose gpu_check records its LD_LIBRARY_PATH, writes results and fails, whose arbiter
/// fails, and whose gpu_hf.py records its LD_LIBRARY_PATH.
fn failing_bundle(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gpu-check.sh");
    std::fs::copy(script, dir.join("gpu-check.sh")).unwrap();
    write_executable(
        &dir.join("bin/gpu_check"),
        r#"#!/usr/bin/env bash
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
mkdir -p "$out"
printf '%s' "$LD_LIBRARY_PATH" >"$out/ld-rust.txt"
echo '{"failures": ["ops: error 1 (tolerance 2e-2)"]}' >"$out/rust-results.json"
printf 'RESULT: 1 FAILED\n  - ops: error 1 (tolerance 2e-2)\n' | tee "$out/rust-report.md"
exit 1
"#,
    );
    write_executable(&dir.join("bin/arbiter"), "#!/usr/bin/env bash\necho 'no GPU here' >&2\nexit 3\n");
    write_executable(
        &dir.join("gpu_hf.py"),
        r#"import argparse, os
ap = argparse.ArgumentParser()
ap.add_argument("--out")
ap.add_argument("--report")
a = ap.parse_args()
open(os.path.join(a.out, "ld-python.txt"), "w").write(os.environ.get("LD_LIBRARY_PATH", "<unset>"))
open(a.report, "a").write("\nRESULT (transformers side): accuracy checks passed\n")
"#,
    );
}

/// Runs the bundle's gpu-check.sh with `$OUT` and `$GPU_CHECK_WORK` under `root`; asserts it
/// fails and leaves exactly the report and the archive in `$OUT`; returns the report.
fn run_failing_check(root: &Path, env: &[(&str, &str)]) -> String {
    run_failing_check_with(root, env, &[])
}

/// [`run_failing_check`] with arguments for gpu-check.sh.
fn run_failing_check_with(root: &Path, env: &[(&str, &str)], args: &[&str]) -> String {
    let out = root.join("out");
    let run = Command::new("bash")
        .arg(root.join("bundle/gpu-check.sh"))
        .args(args)
        .env("OUT", &out)
        .env("GPU_CHECK_WORK", root.join("work"))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(1), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("GPU CHECK: FAILED"), "{stdout}");
    let mut left: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["gpu-check-logs.tar.gz", "gpu-check.md"]);
    std::fs::read_to_string(out.join("gpu-check.md")).unwrap()
}

#[test]
fn fp8_mode_runs_only_the_fp8_section_and_leaves_the_same_two_files() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    failing_bundle(&bundle);
    // The fake gpu_check also records the sections it was asked for.
    let fake = std::fs::read_to_string(bundle.join("bin/gpu_check")).unwrap();
    let fake = fake.replace(
        "while [ $# -gt 0 ]; do [ \"$1\" = --out ] && out=$2; shift; done",
        "args=\"$*\"\nwhile [ $# -gt 0 ]; do [ \"$1\" = --out ] && out=$2; shift; done\nmkdir -p \"$out\"; echo \"$args\" >\"$out/args.txt\"",
    );
    write_executable(&bundle.join("bin/gpu_check"), &fake);
    let report = run_failing_check_with(tmp.path(), &[], &["--fp8"]);
    assert!(report.contains("gpu_check (fp8) exited 1"), "{report}");
    for other in ["gpu_check exited", "(parallel)", "transformers", "CLI:"] {
        assert!(!report.contains(other), "{other:?} ran in --fp8 mode:\n{report}");
    }
    let args = std::fs::read_to_string(tmp.path().join("work/gpu-check-logs/fp8/args.txt")).unwrap();
    assert!(args.contains("--sections fp8"), "{args}");

    let bad = Command::new("bash").arg(bundle.join("gpu-check.sh")).arg("--fp9").output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("usage: gpu-check.sh [--fp8]"));
}

#[test]
fn out_holds_the_report_and_one_archive_even_when_every_step_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let (bundle, out, work) = (tmp.path().join("bundle"), tmp.path().join("out"), tmp.path().join("work"));
    std::fs::create_dir_all(&bundle).unwrap();
    failing_bundle(&bundle);
    let report = run_failing_check(tmp.path(), &[("LD_LIBRARY_PATH", "/as/given/lib")]);
    for line in [
        "gpu_check exited 1",
        "gpu_check (parallel) exited 1",
        "RESULT (transformers side)",
        "CLI: arbiter score failed",
        "GPU CHECK: FAILED",
    ] {
        assert!(report.contains(line), "no {line:?} in the report:\n{report}");
    }

    let unpacked = tmp.path().join("unpacked");
    std::fs::create_dir_all(&unpacked).unwrap();
    let tar = Command::new("tar").arg("-xzf").arg(out.join("gpu-check-logs.tar.gz")).arg("-C").arg(&unpacked).status();
    assert!(tar.unwrap().success());
    let logs = unpacked.join("gpu-check-logs");
    for file in [
        "gpu_check.log",
        "rust-results.json",
        "rust-report.md",
        "gpu_check_parallel.log",
        "parallel/rust-results.json",
        "hf.log",
        "cli.log",
        "summary.txt",
    ] {
        assert!(logs.join(file).is_file(), "{file} is not in the archive");
    }
    assert!(std::fs::read_to_string(logs.join("cli.log")).unwrap().contains("no GPU here"));

    let python = std::fs::read_to_string(logs.join("ld-python.txt")).unwrap();
    assert_eq!(python, "/as/given/lib", "python3 must see the LD_LIBRARY_PATH the script was given");
    let rust = std::fs::read_to_string(logs.join("ld-rust.txt")).unwrap();
    let shim = work.join("libs").display().to_string();
    assert!(rust.split(':').any(|d| d == shim), "the libnccl.so shim folder is not on {rust}");
    assert!(rust.ends_with(":/as/given/lib"), "the given path must come after the CUDA folders: {rust}");
}

#[test]
fn a_hanging_step_is_cut_to_the_time_left_and_the_archive_still_written() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    failing_bundle(&bundle);
    // gpu_check writes part of its report, then hangs.
    write_executable(
        &bundle.join("bin/gpu_check"),
        r#"#!/usr/bin/env bash
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
mkdir -p "$out"
echo '## Kernels against the CPU backend' >"$out/rust-report.md"
exec sleep 60
"#,
    );
    let t = std::time::Instant::now();
    let report = run_failing_check(tmp.path(), &[("GPU_CHECK_SECONDS", "3")]);
    // 3 s for the whole check, then at least 1 s for each of the four later steps.
    assert!(t.elapsed().as_secs() < 20, "took {:?}", t.elapsed());
    assert!(report.contains("## Kernels against the CPU backend"), "{report}");
    assert!(report.contains("gpu_check timed out"), "{report}");
    assert!(report.contains("transformers comparison skipped: gpu_check wrote no results"), "{report}");
}
