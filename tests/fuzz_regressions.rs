//! Crashes found by fuzzing stay fixed: every input saved under `fuzz/regressions/<target>/` is
//! run again through the same harness the fuzzer runs (`fuzz/src/lib.rs`, included here), so
//! this test fails until the bug is fixed. The hand-made seeds of the committed corpus
//! (`fuzz/corpus/<target>/seed-*`) run too, so the harness keeps compiling and working against
//! the API. See fuzz/README.md.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

#[path = "../fuzz/src/lib.rs"]
mod harness;

/// Panics seen, including those the code under test catches itself: under the fuzzer every
/// panic aborts the run (except the library panics `reply_text` absorbs by design, which the
/// harness lets through before they get here), so here every panic fails the test too.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn inputs(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(".");
            name.starts_with(prefix) && !name.starts_with('.') && !name.ends_with(".md")
        })
        .collect();
    files.sort();
    files
}

/// Runs every input of `root/<target>/` whose name starts with `prefix`; returns the crashing ones.
fn run_all(root: &Path, prefix: &str) -> (usize, Vec<String>) {
    let mut failures = Vec::new();
    let mut count = 0;
    for target in harness::TARGETS {
        for file in inputs(&root.join(target), prefix) {
            count += 1;
            let data = std::fs::read(&file).expect("a fuzz input");
            let before = PANICS.load(Ordering::SeqCst);
            let result = std::panic::catch_unwind(|| harness::run(target, &data));
            if result.is_err() || PANICS.load(Ordering::SeqCst) != before {
                failures.push(file.display().to_string());
            }
        }
    }
    (count, failures)
}

/// One test, so that the panic hook is installed once, before the harness adds its own.
#[test]
fn fuzz_regressions_and_seeds_do_not_crash() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let (seeds, seed_failures) = run_all(&fuzz.join("corpus"), "seed-");
    let (count, failures) = run_all(&fuzz.join("regressions"), "");
    assert!(seeds > 0, "no seeds under fuzz/corpus/*/seed-*");
    assert!(
        failures.is_empty() && seed_failures.is_empty(),
        "{} of {count} fuzz regression inputs crash:\n{}\n{} of {seeds} corpus seeds crash:\n{}",
        failures.len(),
        failures.join("\n"),
        seed_failures.len(),
        seed_failures.join("\n")
    );
}
