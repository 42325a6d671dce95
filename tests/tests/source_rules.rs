//! Rules of the code base that a reviewer would otherwise check by eye:
//! every `unsafe` block and `unsafe impl` in the workspace's crates carries
//! a `// SAFETY:` comment just above it (docs/security.md).

use std::path::{Path, PathBuf};

/// How many lines above an `unsafe` its SAFETY comment may start.
const WINDOW: usize = 6;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name();
        if p.is_dir() && name != "target" && name != ".git" {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `file:line` of every `unsafe {` / `unsafe impl` without a SAFETY
/// comment in the lines above it.
fn unexplained_unsafe(text: &str, file: &Path) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut bad = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let code = l.split("//").next().unwrap_or("");
        // An occurrence after an odd number of quotes is inside a string.
        let in_code = |needle: &str| {
            code.match_indices(needle)
                .any(|(at, _)| code[..at].matches('"').count() % 2 == 0)
        };
        if !(in_code("unsafe {") || in_code("unsafe impl")) {
            continue;
        }
        let from = i.saturating_sub(WINDOW);
        if !lines[from..=i].iter().any(|x| x.contains("SAFETY")) {
            bad.push(format!("{}:{}: {}", file.display(), i + 1, l.trim()));
        }
    }
    bad
}

#[test]
fn every_unsafe_says_why_it_is_sound() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in ["crates", "tests", "fuzz"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 50, "found only {} files", files.len());
    let bad: Vec<String> = files
        .iter()
        .flat_map(|f| unexplained_unsafe(&std::fs::read_to_string(f).unwrap_or_default(), f))
        .collect();
    assert!(
        bad.is_empty(),
        "unsafe without a SAFETY comment:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_check_catches_an_unexplained_block() {
    let src = "fn f() {\n    let x = 1;\n    unsafe { g() }\n}\n";
    assert_eq!(unexplained_unsafe(src, Path::new("x.rs")).len(), 1);
    let ok = "fn f() {\n    // SAFETY: g has no preconditions.\n    unsafe { g() }\n}\n";
    assert!(unexplained_unsafe(ok, Path::new("x.rs")).is_empty());
}
