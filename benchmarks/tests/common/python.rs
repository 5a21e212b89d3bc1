//! Python for the tests that drive Quiver with real Python tools (moto, ADBC).
//!
//! `.ci/run` installs them with pip. Where that was not possible, the tests
//! install them into a virtualenv of their own under the temporary folder,
//! once per machine.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// A `python3` that can import every one of `modules`, or one of a virtualenv
/// holding `packages` when the machine's cannot.
pub fn python_importing(modules: &[&str], venv_name: &str, packages: &[&str]) -> PathBuf {
    let check = format!("import {}", modules.join(", "));
    let system_has_them = Command::new("python3")
        .args(["-c", &check])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if system_has_them {
        return PathBuf::from("python3");
    }
    venv(venv_name, packages).join("bin").join("python3")
}

/// The folder of a virtualenv holding `packages`, created on first use.
pub fn venv(name: &str, packages: &[&str]) -> PathBuf {
    let venv = std::env::temp_dir().join(name);
    super::install_once(&venv, || {
        let run = |command: &mut Command| {
            let status = command.status().expect("run python3 to install packages");
            assert!(status.success(), "installing failed: {command:?}");
        };
        run(Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv));
        run(Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet"])
            .args(packages));
    });
    venv
}
