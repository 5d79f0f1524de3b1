//! Shared objects built with gcc for the resolver's tests, here and in the
//! crates that give the resolver their own [`Files`](super::Files).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Compiles C source with gcc into `dir/out`.
pub fn cc(dir: &Path, src: &str, out: &str, args: &[&str]) -> PathBuf {
    let c = dir.join(format!("{out}.c"));
    std::fs::write(&c, src).expect("write the C source");
    let out = dir.join(out);
    let status = Command::new("gcc")
        .arg(&c)
        .arg("-o")
        .arg(&out)
        .args(args)
        .status()
        .expect("gcc must be installed");
    assert!(status.success(), "gcc failed for {}", out.display());
    out
}

/// `bin/prog` with DT_RPATH `$ORIGIN/../x`, which needs `x/liba.so`, which
/// needs `x/libb.so` and has no search path of its own: the loader finds
/// libb only through the DT_RPATH liba inherits from prog.
pub struct InheritedRpath {
    pub program: PathBuf,
    pub liba: PathBuf,
    pub libb: PathBuf,
}

impl InheritedRpath {
    /// Builds the chain under `root` (`root/bin`, `root/x`).
    pub fn build(root: &Path) -> InheritedRpath {
        let bin = root.join("bin");
        let x = root.join("x");
        for d in [&bin, &x] {
            std::fs::create_dir_all(d).expect("create the test directories");
        }
        let xs = x.to_str().expect("a UTF-8 temporary directory");
        let libb = cc(
            &x,
            "int b(void){return 2;}",
            "libb.so",
            &["-shared", "-fPIC"],
        );
        let liba = cc(
            &x,
            "int b(void); int a(void){return b();}",
            "liba.so",
            &["-shared", "-fPIC", "-L", xs, "-lb"],
        );
        let link = format!("-Wl,-rpath-link,{xs}");
        let program = cc(
            &bin,
            "int a(void); int main(void){return a();}",
            "prog",
            &[
                "-L",
                xs,
                "-la",
                &link,
                // DT_RPATH, not the DT_RUNPATH many toolchains emit by default.
                "-Wl,--disable-new-dtags,-rpath,$ORIGIN/../x",
            ],
        );
        InheritedRpath {
            program,
            liba,
            libb,
        }
    }
}
