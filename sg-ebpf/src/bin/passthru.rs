//! The benchmark floor: a classifier that returns "next" without looking at the packet. Built
//! as its own object (`sg-passthru`) so that it can never be attached by the agent; only
//! the classifier section of `cargo xtask bench` (tests/src/bin/sg-bench) loads it, for
//! BPF_PROG_TEST_RUN.
#![no_std]
#![no_main]

use aya_ebpf::{macros::classifier, programs::TcContext};

#[classifier]
pub fn sg_passthru(_ctx: TcContext) -> i32 {
    sg_common::TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
