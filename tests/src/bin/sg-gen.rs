//! Print generated configs: `sg-gen SEED` prints one input document; `sg-gen --batch FIRST N`
//! prints the JSON list `[{"name", "seed", "input"}, ...]` that `tests/oracle/oracle --batch`
//! reads.
use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |s: &String| s.parse::<u64>().with_context(|| format!("not a number: {s}"));
    let json = match args.as_slice() {
        [seed] => serde_json::to_string_pretty(&sg_tests::generator::generate(num(seed)?))?,
        [flag, first, n] if flag == "--batch" => {
            serde_json::to_string(&sg_tests::generator::batch(num(first)?, num(n)? as usize))?
        }
        _ => bail!("usage: sg-gen SEED | sg-gen --batch FIRST_SEED COUNT"),
    };
    println!("{json}");
    Ok(())
}
