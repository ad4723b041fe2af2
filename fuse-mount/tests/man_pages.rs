//! The man pages (`man/*.8`, mdoc): each renders with groff with every
//! warning on and none given, and names every option its program's
//! `--help` lists (and, for hammer2(8), every verb and each verb's
//! options). Needs the tools built (`cargo build --workspace --bins`)
//! and groff (groff-base; scripts/test installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

const MAN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../man");

fn bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_mount-hammer2"))
        .parent()
        .unwrap()
        .join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace --bins`",
        p.display()
    );
    p
}

fn help(bin: &Path, args: &[&str]) -> String {
    let o = Command::new(bin).args(args).arg("--help").output().unwrap();
    assert!(o.status.success(), "{} --help", bin.display());
    String::from_utf8(o.stdout).unwrap()
}

/// The flags of a clap help text's Options section: `-x` and `--long`.
fn flags(help: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if line.starts_with("Options:") {
            inside = true;
            continue;
        }
        if inside && !line.starts_with(' ') {
            inside = false;
        }
        if !inside {
            continue;
        }
        let spec = line.trim_start().split("  ").next().unwrap_or("");
        for tok in spec.split([',', ' ']) {
            let tok = tok.trim();
            if tok.starts_with('-') && tok.len() > 1 {
                out.push(tok.split(['=', '<']).next().unwrap().to_string());
            }
        }
    }
    out
}

/// The verbs of a clap help text's Commands section.
fn verbs(help: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if line.starts_with("Commands:") {
            inside = true;
            continue;
        }
        if inside && !line.starts_with(' ') {
            break;
        }
        if let Some(v) = line.split_whitespace().next() {
            if inside && v != "help" {
                out.push(v.to_string());
            }
        }
    }
    out
}

/// mdoc names a flag `-x` as `Fl x` and `--long` as `Fl -long`.
fn names_flag(page: &str, flag: &str) -> bool {
    let want = format!("Fl {}", &flag[1..]);
    page.split(['\n', ' '])
        .zip(page.split(['\n', ' ']).skip(1))
        .any(|(a, b)| a == "Fl" && format!("Fl {b}") == want)
        || page.contains(&format!("{want} "))
        || page.contains(&format!("{want}\n"))
}

fn check(page_name: &str, bin: &Path, subcommands: bool) {
    let page_path = Path::new(MAN).join(page_name);
    let page = std::fs::read_to_string(&page_path).expect("read the page");
    let o = Command::new("groff")
        .args(["-ww", "-mandoc", "-z"])
        .arg(&page_path)
        .output()
        .expect("groff (groff-base; scripts/test installs it)");
    assert!(o.status.success(), "groff failed on {page_name}");
    assert!(
        o.stderr.is_empty(),
        "{page_name}: groff warns: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let top = help(bin, &[]);
    let mut missing = Vec::new();
    for f in flags(&top) {
        if !names_flag(&page, &f) {
            missing.push(f);
        }
    }
    if subcommands {
        for v in verbs(&top) {
            if !page.contains(&format!("Cm {v}")) {
                missing.push(v.clone());
            }
            for f in flags(&help(bin, &[&v])) {
                if f != "-h" && f != "--help" && !names_flag(&page, &f) {
                    missing.push(format!("{v} {f}"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "{page_name} does not name {missing:?}");
}

#[test]
fn mkfs_page() {
    check("mkfs.hammer2.8", &bin("mkfs-hammer2"), false);
}

#[test]
fn fsck_page() {
    check("fsck.hammer2.8", &bin("fsck-hammer2"), false);
}

#[test]
fn mount_page() {
    check("mount.hammer2.8", &bin("mount-hammer2"), false);
}

#[test]
fn hammer2_page() {
    check("hammer2.8", &bin("hammer2"), true);
}

#[test]
fn the_flag_parser_sees_what_clap_prints() {
    let h = "Usage: x\n\nOptions:\n  -f             Stay\n  -o <OPTIONS>   Mount\n  -v, --verbose  Print\n      --single-pass  One\n\nExit status\n";
    assert_eq!(flags(h), ["-f", "-o", "-v", "--verbose", "--single-pass"]);
    assert!(names_flag(".It Fl v , Fl -verbose\n", "--verbose"));
    assert!(!names_flag(".It Fl vx\n", "-v"));
}
