//! The differential test in CI: every hand-written input and 50 seeded random configurations,
//! 40 scenarios each plus the documented-difference scenarios, through kernel iptables and
//! through the eBPF datapath. Zero mismatches allowed. Also: the harness notices a real
//! difference and writes a reproduction.

use std::path::PathBuf;

use sg_user::diff::{self, Config, backend::Backend};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn iptables_and_ebpf_agree_on_corpus_and_random_configs() {
    let mut args: Vec<String> = vec!["diff".into()];
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(root().join("tests/corpus"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    inputs.sort();
    inputs.push(root().join("sg-user/examples/web1.json"));
    inputs.push(root().join("sg-user/examples/web1-default-only.json"));
    for i in &inputs {
        args.extend(["--input".into(), i.to_string_lossy().into_owned()]);
    }
    let out = std::env::temp_dir().join(sg_tests::unique("sg-diff-ci-"));
    args.extend(
        [
            "--random",
            "50",
            "--seed",
            "1",
            "--scenarios",
            "40",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let res = std::process::Command::new(sg_tests::workspace_bin("sg").unwrap())
        .args(&args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    let total = stdout.lines().find(|l| l.starts_with("TOTAL")).unwrap_or("");
    println!("{stdout}");
    assert!(
        res.status.success(),
        "sg diff failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(
        total.contains(" 0 mismatch") && total.contains(" 0 wrong"),
        "{total}"
    );
    let frames: usize = total
        .split("frames ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(frames > 5_000, "too few frames compared to mean much: {total}");
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn a_real_difference_is_caught_and_reproduced() {
    // The eBPF side enforces the WEB1 input without WEB_SERVERS while iptables enforces it
    // with: every frame to 80/443 must show up as a mismatch, with a reproduction on disk.
    let with = sg_user::model::load(root().join("sg-user/examples/web1.json")).unwrap();
    let without = sg_user::model::load(root().join("sg-user/examples/web1-default-only.json")).unwrap();
    let cfg = Config {
        name: "planted".into(),
        model: with.clone(),
        host: "compute-1".into(),
    };
    let mut scenarios = diff::scenario::generate(&cfg.model, "compute-1", 3, 60);
    scenarios.retain(|s| s.name.contains("-tcp-") || s.name.contains("tcp-rst"));
    assert!(!scenarios.is_empty());

    struct Wrong(diff::backend::Ebpf, sg_user::model::Model);
    impl Backend for Wrong {
        fn name(&self) -> &'static str {
            "ebpf-with-a-planted-bug"
        }
        fn start(&mut self) -> anyhow::Result<()> {
            self.0.start()
        }
        fn apply(
            &mut self,
            _m: &sg_user::model::Model,
            old: Option<&sg_user::model::Model>,
        ) -> anyhow::Result<()> {
            let wrong = self.1.clone();
            self.0.apply(&wrong, old)
        }
        fn reset(&mut self) -> anyhow::Result<()> {
            self.0.reset()
        }
        fn teardown(&mut self) -> anyhow::Result<()> {
            self.0.teardown()
        }
    }
    let tag = sg_tests::unique("pl");
    let make =
        |topo: &diff::topo::Topology, host: &str| -> anyhow::Result<(Box<dyn Backend>, Box<dyn Backend>)> {
            let ipt = diff::backend::Iptables::new(topo, host, sg_user::iptables::Backend::Nft)?;
            let ebpf = diff::backend::Ebpf::new(topo, host, &tag)?;
            Ok((Box::new(ipt), Box::new(Wrong(ebpf, without.clone()))))
        };
    let mut found = Vec::new();
    let s = diff::run_config(&cfg, &scenarios, &tag, &make, &mut found).unwrap();
    assert!(s.mismatches > 0, "the planted difference went unnoticed: {s}");
    let m = &found[0];
    assert_eq!((m.iptables, m.ebpf), (Some(true), Some(false)), "{m:?}");
    let dir = std::env::temp_dir().join(sg_tests::unique("sg-diff-repro-"));
    let repro = diff::write_repro(&dir, &sg_user::model::to_json(&with), &scenarios, &found).unwrap();
    let text = std::fs::read_to_string(repro.join("mismatches.txt")).unwrap();
    assert!(text.contains("iptables: delivered  sg: dropped"), "{text}");
    assert!(repro.join("input.json").exists());
    let _ = std::fs::remove_dir_all(dir);
}
