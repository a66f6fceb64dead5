use std::path::PathBuf;

// Rebuild the object when bpf-linker changes (for example after `cargo xtask setup` rebuilt it
// for a new nightly). bpf-linker may be off PATH: sg-user/build.rs adds $CARGO_HOME/bin.
fn main() {
    let linker = which::which("bpf-linker").ok().or_else(|| {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        let p = home.join("bin/bpf-linker");
        p.exists().then_some(p)
    });
    if let Some(linker) = linker {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    // bpf-linker passes -bpf-expand-memcpy-in-order to LLVM by default, which turns off LLVM's
    // generic expansion of memset/memmove (MaxStoresPerMem* = 0): every struct zeroing and
    // 16-byte address swap became a call to compiler-builtins' byte-at-a-time loop, about
    // half of the per-packet cost. The in-order expansion only helps JITs that pattern-match
    // memcpy, which no kernel JIT we target does.
    println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
