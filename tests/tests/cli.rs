//! What the `sg` command line prints when the user got something wrong: the error with its
//! context and a non-zero exit, never a stack trace, also with `RUST_BACKTRACE=1` set as on
//! many developer machines (issue 12).

use std::process::Command;

use sg_tests::{unique, workspace_bin};

fn sg(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_bin("sg").unwrap())
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_no_backtrace(what: &str, stderr: &str) {
    for marker in [
        "backtrace",
        "Backtrace",
        "at /rustc/",
        "rust_begin_unwind",
        "anyhow::",
    ] {
        assert!(!stderr.contains(marker), "{what}: {marker:?} in\n{stderr}");
    }
}

#[test]
fn user_errors_print_no_backtrace() {
    let dir = std::env::temp_dir().join(unique("sg-cli-"));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"security_groups": [{"id": "sg-1", "security_group_rules": [
            {"id": "r1", "direction": "sideways", "ethertype": "IPv4", "protocol": "tcp",
             "port_range_min": 80, "port_range_max": 70000}]}],
           "address_groups": [], "ports": []}"#,
    )
    .unwrap();
    let bad = bad.to_str().unwrap();
    let missing = dir.join("missing.json");
    let run_dir = dir.join("run");

    let (code, _, err) = sg(&["validate", bad]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("direction=\"sideways\"") && err.contains("70000"),
        "the error names the fields and values:\n{err}"
    );
    assert!(
        err.contains("Error: ") && err.contains("nothing was applied"),
        "{err}"
    );
    assert_no_backtrace("validate", &err);

    for (what, args) in [
        (
            "compile of a missing file",
            vec!["compile", missing.to_str().unwrap()],
        ),
        (
            "trace without an agent",
            vec![
                "--run-dir",
                run_dir.to_str().unwrap(),
                "trace",
                "--port",
                "WEB1",
                "to-vm",
                "tcp",
                "203.0.113.7:40000",
                "192.168.206.6:80",
            ],
        ),
        ("iptables render of bad input", vec!["iptables", "render", bad]),
    ] {
        let (code, _, err) = sg(&args);
        assert_eq!(code, 1, "{what}: {err}");
        assert!(
            err.starts_with("Error: ") || err.contains("\nError: "),
            "{what}: {err}"
        );
        assert_no_backtrace(what, &err);
    }

    // A usage error is clap's: the usage and exit code 2.
    let (code, _, err) = sg(&["validate", "--no-such-flag"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("Usage:"), "{err}");
    assert_no_backtrace("usage", &err);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sg --config FILE` with the real command line: every key is a flag of `sg agent`, checked
/// by that flag's own parser, a bad one is the file's error (exit 78, no backtrace), and the
/// global keys reach the other subcommands.
#[test]
fn config_file_keys_are_the_agent_flags() {
    let dir = std::env::temp_dir().join(unique("sg-cli-"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sg.toml");
    let file_s = file.to_str().unwrap();
    let check = |text: &str, args: &[&str]| {
        std::fs::write(&file, text).unwrap();
        let mut a = vec!["--config", file_s];
        a.extend_from_slice(args);
        sg(&a)
    };

    let (code, _, err) = check("dataplane = \"xdp\"\n", &["agent"]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains(file_s) && err.contains("key `dataplane`") && err.contains("'xdp'"),
        "{err}"
    );
    assert_no_backtrace("bad value", &err);

    let (code, _, err) = check("no-such-flag = 1\n", &["agent"]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("unknown key `no-such-flag`") && err.contains("api-socket"),
        "{err}"
    );
    assert_no_backtrace("unknown key", &err);

    // Relations between flags still hold (api-group needs api-socket), as on the command line.
    let (code, _, err) = check("api-group = \"neutron\"\nstate = \"/x.json\"\n", &["agent"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--api-socket"), "{err}");

    // The global keys reach `sg status`: it looks where the file says.
    let run = dir.join("no-run-state-here");
    let (code, _, err) = check(
        &format!("run-dir = {:?}\nct-entries = 1024\n", run.to_str().unwrap()),
        &["status"],
    );
    assert_ne!(code, 0);
    assert!(err.contains(run.to_str().unwrap()), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
