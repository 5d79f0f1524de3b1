//! `juice completions` and `juice man` describe every subcommand the binary has.
//! Nothing here needs root, a daemon or the network.

use std::process::{Command, Output};

fn juice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_juice"))
        .args(args)
        .output()
        .expect("juice runs")
}

/// Runs `juice ARGS`, which must exit 0; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = juice(args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "juice {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The top-level subcommands, as `juice --help` lists them (so a new one is covered
/// without editing this test). `help` is clap's own and has no page or script entry
/// of its own to check.
fn subcommands() -> Vec<String> {
    let help = ok(&["--help"]);
    let names: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_owned)
        .collect();
    for known in ["build", "run", "get", "completions", "man"] {
        assert!(
            names.iter().any(|n| n == known),
            "`juice --help` should list {known}; parsed {names:?} from:\n{help}"
        );
    }
    names
}

#[test]
fn the_bash_completion_script_offers_every_subcommand() {
    let script = ok(&["completions", "bash"]);
    let commands = subcommands();
    // Bash completes from one word list of the top level's subcommands and options.
    let top = script
        .lines()
        .find(|l| l.contains("opts=") && l.contains("build"))
        .unwrap_or_else(|| panic!("no top-level word list in:\n{script}"));
    for c in &commands {
        assert!(
            top.split(|ch: char| ch.is_whitespace() || ch == '"')
                .any(|w| w == c),
            "bash completion lacks `{c}`: {top}"
        );
    }
}

#[test]
fn every_shell_gets_a_script() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = ok(&["completions", shell]);
        assert!(
            script.contains("juice") && script.contains("rollback"),
            "the {shell} script names neither juice nor its subcommands:\n{script}"
        );
    }
}

#[test]
fn a_shell_outside_the_set_is_refused_with_the_possible_values() {
    let out = juice(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("possible values: bash, elvish, fish, powershell, zsh"),
        "{err}"
    );
}

#[test]
fn the_man_page_names_every_subcommand() {
    let page = ok(&["man"]);
    assert!(page.contains(".TH juice 1"), "not juice(1):\n{page}");
    for c in subcommands() {
        // roff writes a hyphen as `\-`.
        assert!(
            page.contains(&format!("juice\\-{c}(1)")),
            "juice(1) does not mention juice-{c}(1)"
        );
    }
    assert!(
        !page.contains("juice\\-help(1)"),
        "juice(1) points to a juice-help(1) that is never written"
    );
}

#[test]
fn man_dir_writes_a_page_for_juice_and_each_subcommand() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let pages = dir.path().join("man1");
    let said = ok(&["man", "--dir", &pages.display().to_string()]);
    let commands = subcommands();
    assert!(
        said.contains(&format!("wrote {} man pages", commands.len() + 1)),
        "{said}"
    );
    let top = std::fs::read_to_string(pages.join("juice.1")).expect("juice.1 written");
    assert!(top.contains(".TH juice 1"));
    for c in &commands {
        let page = std::fs::read_to_string(pages.join(format!("juice-{c}.1")))
            .unwrap_or_else(|e| panic!("juice-{c}.1: {e}"));
        assert!(
            page.contains(&format!(".TH juice-{c} 1")),
            "juice-{c}.1 is not that page:\n{page}"
        );
    }
}
