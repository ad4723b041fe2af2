//! `bufcache::backing` against real loop devices: a loop device with an
//! offset and a size limit resolves to that range of its backing file,
//! the loop devices over a range are found, and an exclusive open shows
//! as a claim. Needs root and loop devices (util-linux's losetup); fails
//! without them. The loop device is detached however the test ends.

use bufcache::backing::{self, Backing};
use std::path::{Path, PathBuf};
use std::process::Command;

struct LoopDev(PathBuf);

impl LoopDev {
    fn attach(file: &Path, extra: &[&str]) -> LoopDev {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .args(extra)
            .arg(file)
            .output()
            .expect("run losetup (util-linux; root)");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDev(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn a_loop_device_is_a_range_of_its_backing_file() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("backing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("img");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(8 << 20))
        .unwrap();
    let whole = backing::resolve(&file).unwrap();
    let lo = LoopDev::attach(&file, &["-o", "1048576", "--sizelimit", "2097152"]);
    let b = backing::resolve(&lo.0).unwrap();
    assert_eq!(b.data, file.canonicalize().unwrap());
    assert_eq!((b.dev, b.ino), (whole.dev, whole.ino));
    assert_eq!((b.start, b.end), (1 << 20, Some(3 << 20)));
    assert_eq!(b.via, vec![lo.0.clone()]);
    assert!(b.block_device && b.overlaps(&whole));
    assert!(b
        .describe()
        .contains(&format!("bytes {}..{}", 1 << 20, 3 << 20)));

    assert!(backing::loops_over(&whole).contains(&lo.0));
    let beyond = Backing {
        start: 4 << 20,
        end: Some(5 << 20),
        ..whole.clone()
    };
    assert!(!backing::loops_over(&beyond).contains(&lo.0));

    assert!(!backing::claimed(&lo.0));
    let held = backing::claim(&lo.0, false).unwrap();
    assert!(backing::claimed(&lo.0));
    drop(held);
    assert!(!backing::claimed(&lo.0));
    drop(lo);
    std::fs::remove_dir_all(&dir).unwrap();
}
