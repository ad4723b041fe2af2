//! `hammer2 setcomp` and `hammer2 setcheck`, offline on an image: set the
//! compression or check method of files and directories (and with `-r`
//! of everything under a directory), as DragonFly's `cmd_setcomp.c`
//! does through a mount. Blocks already written keep their methods; new
//! writes, and files created later in a changed directory, use the new
//! ones. The target is `IMG[@LABEL][:/PATH]` (the PFS defaults to DATA,
//! the path to the PFS root), worked on offline; or a file or directory
//! in a running mount.hammer2, changed through its control channel
//! (`SetMethods` on a descriptor of each, as DragonFly's tool issues
//! `HAMMER2IOC_INODE_SET` on each path; with `-r` the tool walks the
//! directories itself, as DragonFly's does, not following symlinks).

use crate::admin::{open_rw, split_spec, LABEL_DEFAULT};
use crate::online;
use crate::CmdError;
use hammer2::ctl::{Reply, Request};
use hammer2::mount::ROOT_INUM;
use hammer2::setmethods::{
    check_is_extension, comp_is_extension, parse_check, parse_comp, Methods,
};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Which field the verb sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Comp,
    Check,
}

/// Split `IMG[@LABEL][:/PATH]` at the first `:/`.
pub fn split_target(target: &str) -> (String, String) {
    // An NBD URI's own "://" is not the split.
    let from = match bufcache::nbd::is_uri(target) {
        true => target.find("://").map_or(0, |i| i + 3),
        false => 0,
    };
    match target[from..].find(":/").map(|i| i + from) {
        Some(i) => (target[..i].to_string(), target[i + 1..].to_string()),
        None => (target.to_string(), "/".to_string()),
    }
}

/// `hammer2 setcomp|setcheck [-r] METHOD TARGET...`.
pub fn run(
    field: Field,
    method: &str,
    targets: &[String],
    recursive: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<u64, CmdError> {
    let fail = |e: hammer2::Error| CmdError::Fail(format!("{method}: {e}"));
    let (methods, name, value, extension) = match field {
        Field::Comp => {
            let c = parse_comp(method).map_err(fail)?;
            let m = Methods {
                comp: Some(c),
                check: None,
            };
            (m, "comp_algo", c, comp_is_extension(c))
        }
        Field::Check => {
            let c = parse_check(method).map_err(fail)?;
            let m = Methods {
                comp: None,
                check: Some(c),
            };
            (m, "check_algo", c, check_is_extension(c))
        }
    };
    if extension {
        writeln!(
            err,
            "warning: {method} is an extension method of this implementation \
             ({name} {:#04x}); DragonFly BSD cannot read blocks written with it",
            value
        )?;
    }
    for target in targets {
        if let Some(ch) = online::channel(Path::new(target))? {
            drop(ch);
            online_tree(Path::new(target), methods, name, recursive, out)?;
            continue;
        }
        let (spec, path) = split_target(target);
        let (img_path, label) = split_spec(&spec);
        let label = label.unwrap_or_else(|| LABEL_DEFAULT.to_string());
        let (img, mut m) = open_rw(&img_path)?;
        let mut inum = ROOT_INUM;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            inum = m
                .lookup(&label, inum, part.as_bytes())
                .map_err(|e| img.fail(&format!("{label}:{path}"), &e))?
                .ok_or_else(|| CmdError::Fail(format!("{target}: no such file or directory")))?;
        }
        let mut lines = Vec::new();
        m.set_methods(&label, inum, methods, recursive, &mut |rel, _| {
            let shown = if rel.is_empty() {
                target.clone()
            } else {
                format!(
                    "{}/{}",
                    target.trim_end_matches('/'),
                    String::from_utf8_lossy(rel)
                )
            };
            lines.push(format!("{shown}\t{name}={value:#04x}"));
        })
        .map_err(|e| img.fail(&format!("{name} on {target}"), &e))?;
        m.flush()
            .map_err(|e| img.fail(&format!("flush after {name} on {target}"), &e))?;
        crate::admin::finish(&img, &mut m)?;
        for l in lines {
            writeln!(out, "{l}")?;
        }
    }
    Ok(0)
}

/// Online: set the methods of `top` (and with `recursive` of every file
/// and directory under it) through the mount's control channel.
fn online_tree(
    top: &Path,
    methods: Methods,
    name: &str,
    recursive: bool,
    out: &mut dyn Write,
) -> Result<(), CmdError> {
    use std::os::unix::fs::MetadataExt;
    let mut stack: Vec<PathBuf> = vec![top.to_path_buf()];
    // Directories entered, by (device, inode): one met again is a loop
    // (as chmod -R and find report one) and is not entered twice.
    let mut entered = std::collections::HashSet::new();
    while let Some(path) = stack.pop() {
        let ch = online::channel(&path)?.ok_or_else(|| {
            CmdError::Fail(format!("{}: not on the mount any more", path.display()))
        })?;
        let req = Request::SetMethods {
            comp: methods.comp,
            check: methods.check,
        };
        let value = match online::call(&ch, req, name)? {
            Reply::Stat(st) if name == "comp_algo" => st.comp_algo,
            Reply::Stat(st) => st.check_algo,
            other => {
                return Err(CmdError::Fail(format!(
                    "{}: unexpected reply from mount.hammer2: {other:?}",
                    path.display()
                )))
            }
        };
        writeln!(out, "{}\t{name}={value:#04x}", path.display())?;
        if !recursive {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| CmdError::Fail(format!("{}: {e}", path.display())))?;
        if !meta.is_dir() {
            continue;
        }
        if !entered.insert((meta.dev(), meta.ino())) {
            return Err(CmdError::Fail(format!(
                "{}: file system loop detected (this directory was already walked); \
                 the image is damaged: run fsck.hammer2",
                path.display()
            )));
        }
        let mut children = Vec::new();
        for e in std::fs::read_dir(&path)
            .map_err(|e| CmdError::Fail(format!("{}: {e}", path.display())))?
        {
            let e = e.map_err(|e| CmdError::Fail(format!("{}: {e}", path.display())))?;
            let t = e
                .file_type()
                .map_err(|err| CmdError::Fail(format!("{}: {err}", e.path().display())))?;
            // Symlinks cannot be opened without following them; other
            // special files are opened as they are.
            if !t.is_symlink() {
                children.push(e.path());
            }
        }
        children.sort();
        stack.extend(children.into_iter().rev());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split_at_the_first_colon_slash() {
        assert_eq!(
            split_target("d.img@DATA:/a/b"),
            ("d.img@DATA".into(), "/a/b".into())
        );
        assert_eq!(split_target("d.img"), ("d.img".into(), "/".into()));
        assert_eq!(split_target("d.img:/"), ("d.img".into(), "/".into()));
        assert_eq!(
            split_target("d.img:s1d@DATA:/x"),
            ("d.img:s1d@DATA".into(), "/x".into())
        );
        assert_eq!(
            split_target("nbd+unix:///e?socket=/s@DATA:/x"),
            ("nbd+unix:///e?socket=/s@DATA".into(), "/x".into())
        );
        assert_eq!(split_target("nbd://h/e"), ("nbd://h/e".into(), "/".into()));
    }
}
