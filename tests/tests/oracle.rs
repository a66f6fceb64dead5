//! The Neutron oracle (`tests/oracle/`): Neutron 29's real IptablesFirewallDriver, driven on sg's
//! input. These tests hold the oracle itself to account, before sg's renderer is compared with it:
//!
//! - it accepts the whole corpus and 200 seeded random configs in every option variant (the
//!   generator's documents pass Neutron's own API validators; the oracle never crashes);
//! - on the spec's §12 example it prints the expected text (tests/oracle/spec12.expected);
//! - what it prints loads into the kernel (nft and legacy) in throwaway namespaces.
//!
//! The first run installs the oracle's virtualenv (about 100 s; cached afterwards).
//! A longer random run: `SG_GEN_SEED=5000 SG_GEN_COUNT=2000 cargo test -p sg-tests --test oracle`.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use serde_json::{Value, json};
use sg_tests::generator::{self, LOCAL_HOST};

const VARIANTS: &[(&str, &[&str])] = &[
    ("linuxbridge", &["--agent", "linuxbridge"]),
    (
        "linuxbridge --no-comments",
        &["--agent", "linuxbridge", "--no-comments"],
    ),
    (
        "linuxbridge --no-ipset",
        &["--agent", "linuxbridge", "--no-ipset"],
    ),
    ("ovs-hybrid", &["--agent", "ovs-hybrid"]),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs the oracle in batch mode on `[{name, input}]` and returns its JSON list.
fn oracle(args: &[&str], batch: &Value) -> Vec<Value> {
    let mut child = Command::new(root().join("tests/oracle/oracle"))
        .args(["--batch", "--host", LOCAL_HOST])
        .args(args)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tests/oracle/oracle");
    let input = serde_json::to_vec(batch).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("oracle output");
    writer.join().unwrap().expect("write oracle input");
    assert!(
        out.status.code().is_some_and(|c| c == 0 || c == 2),
        "oracle {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("oracle prints a JSON list")
}

/// The hand-written corpus (`tests/corpus/*.json`) and the project's reference inputs
/// (`sg-user/examples/*.json`: WEB1 / WEB_SERVERS), named by file stem.
fn corpus() -> Vec<Value> {
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["tests/corpus", "sg-user/examples"] {
        let dir = root().join(dir);
        files.extend(
            std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "json")),
        );
    }
    files.sort();
    assert!(files.len() >= 12, "corpus missing");
    files
        .iter()
        .map(|p| {
            let doc: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            json!({"name": p.file_stem().unwrap().to_string_lossy(), "input": doc})
        })
        .collect()
}

fn output_of<'a>(results: &'a [Value], name: &str) -> &'a str {
    results
        .iter()
        .find(|r| r["name"] == name)
        .and_then(|r| r["output"].as_str())
        .unwrap_or_else(|| panic!("no output for {name}"))
}

#[test]
fn oracle_accepts_corpus_and_random_configs() {
    let seed = env_u64("SG_GEN_SEED", 1000);
    let count = env_u64("SG_GEN_COUNT", 200) as usize;
    let mut batch = corpus();
    let n_corpus = batch.len();
    batch.extend(
        generator::batch(seed, count)
            .into_iter()
            .map(|c| serde_json::to_value(c).unwrap()),
    );
    let batch = Value::Array(batch);
    // Install the venv once before the parallel runs (they would serialise on its lock anyway).
    let st = Command::new(root().join("tests/oracle/setup_venv.sh"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "tests/oracle/setup_venv.sh failed");

    std::thread::scope(|s| {
        let runs: Vec<_> = VARIANTS
            .iter()
            .map(|(label, args)| {
                let batch = &batch;
                s.spawn(move || {
                    let t = Instant::now();
                    (label, oracle(args, batch), t.elapsed())
                })
            })
            .collect();
        for run in runs {
            let (label, results, took) = run.join().unwrap();
            assert_eq!(results.len(), n_corpus + count);
            let mut bad = Vec::new();
            for r in &results {
                match r["output"].as_str() {
                    Some(text) => {
                        assert!(text.starts_with("# IPv4\n*filter\n"), "{}: {text}", r["name"]);
                        assert!(text.contains("\nCOMMIT\n# IPv6\n*filter\n"), "{}", r["name"]);
                        assert!(text.contains("\nCOMMIT\n# ipset\n"), "{}", r["name"]);
                    }
                    None => bad.push(format!("{}: {}{}", r["name"], r["error"], r["crash"])),
                }
            }
            assert!(
                bad.is_empty(),
                "oracle [{label}] rejected or crashed on:\n{}",
                bad.join("\n")
            );
            eprintln!(
                "oracle [{label}]: {} corpus + {count} random (seeds {seed}..) in {:.1?}",
                n_corpus, took
            );
        }
    });
}

#[test]
fn oracle_prints_the_spec_example_and_web1() {
    let results = oracle(&["--agent", "linuxbridge"], &Value::Array(corpus()));
    let got = output_of(&results, "spec12");
    let want = std::fs::read_to_string(root().join("tests/oracle/spec12.expected")).unwrap();
    assert_eq!(got, want, "spec §12 example changed (see tests/oracle/README.md)");

    // issue 6, "Done when"
    let web1 = output_of(&results, "web1");
    assert!(web1.contains(":neutron-linuxbri-oadcc4b66-c - [0:0]\n"));
    assert!(web1.contains(
        "-A neutron-linuxbri-sadcc4b66-c -s 192.168.206.6/32 -m mac --mac-source FA:16:3E:DC:D2:AB "
    ));
}

#[test]
fn oracle_output_loads_into_the_kernel() {
    let out = Command::new("python3")
        .arg(root().join("tests/oracle/kernel_check.py"))
        .output()
        .expect("run tests/oracle/kernel_check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "{}",
        stdout
            .lines()
            .skip_while(|l| !l.starts_with("Kernel"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        out.status.success(),
        "kernel check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
