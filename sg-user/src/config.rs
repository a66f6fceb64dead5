//! `sg --config FILE`: the agent's configuration file (`/etc/sg/sg.toml` in the package).
//!
//! The file holds no schema of its own: each top-level key is a long flag of `sg agent` (or one
//! of the global flags), spelled as on the command line without the dashes, so every flag the
//! agent gains is configurable the day it is added:
//!
//! ```toml
//! state = "/var/lib/sg/neutron.json"   # --state /var/lib/sg/neutron.json
//! ct-entries = 524288                  # --ct-entries 524288
//! no-ipset = true                      # --no-ipset (false: the flag is left out)
//! ```
//!
//! The file's flags are placed right after the subcommand, before the command line's own, and
//! every flag overrides an earlier occurrence of itself (`args_override_self`): the command line
//! wins. An array gives a repeatable flag once per element, and a command-line use of that flag
//! replaces the whole array. A key that is not a flag, or a value the flag refuses, is an error
//! naming the file, the key and the value; nothing runs.
//!
//! Only `sg agent` takes every key; the other subcommands take the global ones (`pin-root`,
//! `run-dir`), so `sg --config /etc/sg/sg.toml status` looks where the configured agent pins.

use std::{
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Arg, ArgAction, Command};

/// The flag that names the file.
pub const FLAG: &str = "config";
/// The subcommand whose flags the file configures.
pub const SUBCOMMAND: &str = "agent";

/// Returns `args` (argv, program name first) with the flags of the `--config` file, if one is
/// given, inserted after the subcommand. `cmd` is the program's clap definition.
pub fn expand(cmd: &Command, args: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(file) = config_path(&args) else {
        return Ok(args);
    };
    let Some((at, sub_name)) = subcommand_position(cmd, &args) else {
        // No subcommand: clap reports what is missing.
        return Ok(args);
    };
    let schema = cmd
        .find_subcommand(SUBCOMMAND)
        .ok_or_else(|| anyhow!("the program has no `{SUBCOMMAND}` subcommand"))?;
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| anyhow!("{}: {}", file.display(), e.to_string().trim_end()))?;
    let mut inserted = Vec::new();
    for (key, value) in &table {
        let global = flag_arg(cmd, key).filter(|a| a.is_global_set());
        let arg = global.or_else(|| flag_arg(schema, key)).ok_or_else(|| {
            anyhow!(
                "{}: unknown key `{key}`: it is not a flag of `sg {SUBCOMMAND}` (the keys are its \
                 long flags without the dashes: {})",
                file.display(),
                known_keys(cmd, schema).join(", ")
            )
        })?;
        let flag_args =
            to_args(arg, value).map_err(|e| anyhow!("{}: key `{key}` = {value}: {e}", file.display()))?;
        check_values(arg, &flag_args).map_err(|e| anyhow!("{}: key `{key}`: {e}", file.display()))?;
        let applies = global.is_some() || sub_name == SUBCOMMAND;
        if applies && !given_on_command_line(&args[at + 1..], arg) {
            inserted.extend(flag_args);
        }
    }
    let mut out = args[..=at].to_vec();
    out.extend(inserted);
    out.extend_from_slice(&args[at + 1..]);
    Ok(out)
}

/// The value of `--config FILE` / `--config=FILE`, wherever it is (it is a global flag).
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let long = format!("--{FLAG}");
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            return None;
        }
        if s == long {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix(&format!("{long}=")) {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// Index and name of the subcommand in `args`: the first word that is neither a top-level
/// flag nor a top-level flag's value.
fn subcommand_position(cmd: &Command, args: &[OsString]) -> Option<(usize, String)> {
    let mut i = 1;
    while i < args.len() {
        let s = args[i].to_string_lossy();
        if s == "--" {
            return None;
        }
        if let Some(long) = s.strip_prefix("--") {
            if !long.contains('=')
                && cmd
                    .get_arguments()
                    .any(|a| a.get_long() == Some(long) && a.get_action().takes_values())
            {
                i += 1;
            }
        } else if !s.starts_with('-') {
            return Some((i, s.into_owned()));
        }
        i += 1;
    }
    None
}

fn flag_arg<'a>(cmd: &'a Command, key: &str) -> Option<&'a Arg> {
    if key == FLAG || key == "help" || key == "version" {
        return None;
    }
    cmd.get_arguments().find(|a| a.get_long() == Some(key))
}

fn known_keys(cmd: &Command, schema: &Command) -> Vec<String> {
    let mut keys: Vec<String> = cmd
        .get_arguments()
        .filter(|a| a.is_global_set())
        .chain(schema.get_arguments())
        .filter_map(|a| a.get_long())
        .filter(|l| ![FLAG, "help", "version"].contains(l))
        .map(str::to_owned)
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// The command-line words a key and its value stand for.
fn to_args(arg: &Arg, value: &toml::Value) -> Result<Vec<OsString>> {
    let long = arg.get_long().expect("found by its long name");
    let flag = OsString::from(format!("--{long}"));
    let scalar = |v: &toml::Value| -> Result<String> {
        Ok(match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Datetime(d) => d.to_string(),
            toml::Value::Array(_) | toml::Value::Table(_) => {
                bail!("a flag takes a string, a number or a boolean here")
            }
        })
    };
    if !arg.get_action().takes_values() {
        return match (arg.get_action(), value) {
            (ArgAction::SetTrue, toml::Value::Boolean(true)) => Ok(vec![flag]),
            (ArgAction::SetTrue, toml::Value::Boolean(false)) => Ok(vec![]),
            (ArgAction::SetTrue, _) => bail!("--{long} is a switch: write true or false"),
            _ => bail!("--{long} cannot be set from the file"),
        };
    }
    match value {
        toml::Value::Array(items) => {
            if !matches!(arg.get_action(), ArgAction::Append) {
                bail!("--{long} takes one value, not a list");
            }
            let mut out = Vec::new();
            for item in items {
                out.push(flag.clone());
                out.push(scalar(item)?.into());
            }
            Ok(out)
        }
        v => Ok(vec![flag, scalar(v)?.into()]),
    }
}

/// Runs the flag's own value parser on the file's values, so that a bad value is reported as
/// the file's (clap alone would blame the command line).
fn check_values(arg: &Arg, words: &[OsString]) -> Result<()> {
    if words.is_empty() || !arg.get_action().takes_values() {
        return Ok(());
    }
    // The flag alone: its action and value parser, none of its relations to other flags
    // (`required_unless_present = ...` naming a flag the probe does not have is a clap error).
    // clap takes flag names as &'static str; a probe runs once per key and command line.
    let long: &'static str = Box::leak(
        arg.get_long()
            .expect("found by its long name")
            .to_owned()
            .into_boxed_str(),
    );
    let mut alone = Arg::new(arg.get_id().clone())
        .long(long)
        .action(arg.get_action().clone())
        .value_parser(arg.get_value_parser().clone());
    if let Some(n) = arg.get_num_args() {
        alone = alone.num_args(n);
    }
    let probe = Command::new("sg")
        .no_binary_name(true)
        .disable_help_flag(true)
        .arg(alone);
    match probe.try_get_matches_from(words) {
        Ok(_) => Ok(()),
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            bail!("{}", first.trim_start_matches("error: "))
        }
    }
}

/// Whether the command line after the subcommand already gives `arg` (then a repeatable flag
/// from the file is left out whole, rather than merged with the command line's values).
fn given_on_command_line(rest: &[OsString], arg: &Arg) -> bool {
    if !matches!(arg.get_action(), ArgAction::Append) {
        // args_override_self settles single-valued flags: the later, command-line one wins.
        return false;
    }
    let long = format!("--{}", arg.get_long().unwrap_or_default());
    rest.iter()
        .map(|a| a.to_string_lossy())
        .take_while(|a| a != "--")
        .any(|a| a == long || a.starts_with(&format!("{long}=")))
}

/// The man pages (`sg.1`, `sg-agent.1`, ...) and the bash and zsh completions of `cmd`, written
/// under `dir/man` and `dir/completions` (what the Debian package installs).
pub fn generate_docs(cmd: Command, dir: &Path) -> Result<Vec<PathBuf>> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    // Section 8, system administration: the package installs sg in /usr/sbin, since Debian's
    // `login` owns /usr/bin/sg and sg(1).
    fn pages(cmd: &Command, dir: &Path) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            pages(sub, dir)?;
        }
        clap_mangen::Man::new(cmd.clone())
            .section("8")
            .generate_to(dir)
            .map(|_| ())
    }
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    pages(&cmd, &man).with_context(|| format!("writing man pages to {}", man.display()))?;
    let mut written = Vec::new();
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh] {
        written.push(
            clap_complete::generate_to(shell, &mut cmd, "sg", &completions)
                .with_context(|| format!("writing the {shell} completion"))?,
        );
    }
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    pages.sort();
    written.extend(pages);
    Ok(written)
}

/// `OsStr` helper for tests and callers building argv by hand.
pub fn argv<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(words: I) -> Vec<OsString> {
    words.into_iter().map(|w| w.as_ref().to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> Command {
        Command::new("sg")
            .args_override_self(true)
            .arg(
                Arg::new("pin-root")
                    .long("pin-root")
                    .global(true)
                    .default_value("/p"),
            )
            .arg(Arg::new("config").long("config").global(true))
            .subcommand(
                Command::new("agent")
                    .arg(
                        Arg::new("state")
                            .long("state")
                            .required_unless_present("api-socket"),
                    )
                    .arg(Arg::new("api-socket").long("api-socket"))
                    .arg(
                        Arg::new("ct-entries")
                            .long("ct-entries")
                            .value_parser(clap::value_parser!(u32)),
                    )
                    .arg(Arg::new("no-ipset").long("no-ipset").action(ArgAction::SetTrue))
                    .arg(Arg::new("peer").long("peer").action(ArgAction::Append)),
            )
            .subcommand(Command::new("status"))
    }

    fn file(text: &str) -> (PathBuf, impl Drop) {
        struct Rm(PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "sg-config-test-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&p, text).unwrap();
        (p.clone(), Rm(p))
    }

    fn expanded(text: &str, words: &[&str]) -> Result<Vec<String>> {
        let (p, _rm) = file(text);
        let mut a = vec!["sg", "--config", p.to_str().unwrap()];
        a.extend_from_slice(words);
        Ok(expand(&cli(), argv(&a))?
            .into_iter()
            .skip(3)
            .map(|s| s.into_string().unwrap())
            .collect())
    }

    #[test]
    fn keys_become_flags_after_the_subcommand_before_the_command_line() {
        let got = expanded(
            "state = \"/s.json\"\nct-entries = 7\nno-ipset = true\npin-root = \"/q\"\n",
            &["agent", "--ct-entries", "9"],
        )
        .unwrap();
        assert_eq!(
            got,
            [
                "agent",
                "--ct-entries",
                "7",
                "--no-ipset",
                "--pin-root",
                "/q",
                "--state",
                "/s.json",
                "--ct-entries",
                "9"
            ]
        );
        // The command line's --ct-entries wins.
        let m = cli()
            .try_get_matches_from(
                ["sg".to_string(), "--config".into(), "x".into()]
                    .into_iter()
                    .chain(got),
            )
            .unwrap();
        let agent = m.subcommand_matches("agent").unwrap();
        assert_eq!(agent.get_one::<u32>("ct-entries"), Some(&9));
        assert_eq!(agent.get_one::<String>("pin-root").unwrap(), "/q");
    }

    #[test]
    fn false_switch_is_left_out_and_lists_repeat_unless_the_command_line_gives_them() {
        let got = expanded("no-ipset = false\npeer = [\"a\", \"b\"]\n", &["agent"]).unwrap();
        assert_eq!(got, ["agent", "--peer", "a", "--peer", "b"]);
        let got = expanded("peer = [\"a\", \"b\"]\n", &["agent", "--peer=c"]).unwrap();
        assert_eq!(got, ["agent", "--peer=c"]);
    }

    #[test]
    fn other_subcommands_take_only_the_global_keys() {
        let got = expanded("state = \"/s\"\npin-root = \"/q\"\n", &["status"]).unwrap();
        assert_eq!(got, ["status", "--pin-root", "/q"]);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_file_and_the_key() {
        let (p, _rm) = file("stat = \"/s\"\n");
        let e = expand(&cli(), argv(["sg", "--config", p.to_str().unwrap(), "agent"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains(p.to_str().unwrap()), "{e}");
        assert!(e.contains("unknown key `stat`"), "{e}");
        assert!(
            e.contains("api-socket, ct-entries, no-ipset, peer, pin-root, state"),
            "{e}"
        );

        let e = expanded("ct-entries = \"lots\"\n", &["agent"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `ct-entries`") && e.contains("'lots'"), "{e}");
        let e = expanded("no-ipset = 1\n", &["agent"]).unwrap_err().to_string();
        assert!(e.contains("is a switch"), "{e}");
        let e = expanded("state = [\"a\"]\n", &["agent"]).unwrap_err().to_string();
        assert!(e.contains("takes one value"), "{e}");
        let e = expanded("config = \"/x\"\n", &["agent"]).unwrap_err().to_string();
        assert!(e.contains("unknown key `config`"), "{e}");
        let e = expanded("state = \n", &["agent"]).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn without_config_nothing_changes() {
        let a = argv(["sg", "agent", "--state", "x"]);
        assert_eq!(expand(&cli(), a.clone()).unwrap(), a);
    }
}
